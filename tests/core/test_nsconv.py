import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core.config import ModelConfig, SapConfig
from fedmef_core.models import build_model, prunable_weights
from fedmef_core.models.nsconv import GAIN_INIT, NSConv, attach_masks, convert_to_nsconv, standardize
from fedmef_core.sap import apply_sap


def test_standardized_weight_has_zero_mean_and_unit_fan_in_scaled_variance():
    torch.manual_seed(0)
    conv = NSConv(6, 4, 3, groups=2)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(torch.randn(4, 1, 1, 1))  # arbitrary scale and per-channel offset
    w_hat = conv.standardized_weight().flatten(1)
    fan_in = 3 * 3 * 3
    assert w_hat.shape[1] == fan_in
    torch.testing.assert_close(w_hat.mean(1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(w_hat.var(1, unbiased=False) * fan_in, torch.full((4,), GAIN_INIT**2))
    with torch.no_grad():
        conv.gain.copy_(torch.arange(1.0, 5.0))
    w_hat = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(w_hat.std(1, unbiased=False) * fan_in**0.5, torch.arange(1.0, 5.0))


@pytest.mark.parametrize("density", [1.0, 0.1])
def test_initial_gain_keeps_the_signal_of_a_relu_input_at_unit_variance(density):
    """No BatchNorm rescales the activations, so the initial gain must: a ReLU'd unit Gaussian input
    (variance (1 - 1/pi) / 2) leaves a freshly built NSConv, dense or sparse, with unit variance per channel."""
    torch.manual_seed(5)
    conv = NSConv(32, 64, 3, padding=1)
    mask = (torch.rand_like(conv.weight) < density).float()
    attach_masks(conv, {"weight": mask})
    with torch.no_grad():
        conv.weight.mul_(mask)  # as the pruning code leaves it: zero outside the mask
        out = conv(torch.relu(torch.randn(64, 32, 8, 8)))
    assert out.var((0, 2, 3)).mean().item() == pytest.approx(1.0, abs=0.15)  # per channel; g = 1 gives 0.3


def test_constant_channel_uses_eps_and_mask_multiplies():
    w = torch.ones(2, 1, 2, 2)
    assert torch.equal(standardize(w, torch.ones(2)), torch.zeros(2, 1, 2, 2))  # no division by zero
    w = torch.randn(2, 1, 2, 2)
    mask = (torch.rand(2, 1, 2, 2) > 0.5).float()
    assert torch.equal(standardize(w, torch.ones(2), mask), standardize(w, torch.ones(2)) * mask)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("gamma", [None, 0.0])
def test_nsconv_forward_and_grads_match_plain_autograd(masked, gamma):
    torch.manual_seed(1)
    conv = NSConv(4, 6, 3, stride=2, padding=1, bias=True)
    if masked:
        conv.weight_mask = (torch.rand_like(conv.weight) > 0.6).float()
    if gamma is not None:
        apply_sap(conv, SapConfig(gamma=gamma, value_dtype="float32", positions="bitmap"))
        assert conv.sap is not None
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    out = conv(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [x.grad, conv.weight.grad, conv.gain.grad, conv.bias.grad]
    x2 = x.detach().clone().requires_grad_(True)
    w, g, b = (t.detach().clone().requires_grad_(True) for t in (conv.weight, conv.gain, conv.bias))
    ref_out = F.conv2d(x2, standardize(w, g, conv.weight_mask), b, 2, 1)
    ref_out.backward(grad)
    torch.testing.assert_close(out, ref_out)
    for a, r in zip(got, [x2.grad, w.grad, g.grad, b.grad]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "mobilenetv2"])
def test_nsconv_models_have_no_batchnorm(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, norm="nsconv"), 3, 10, 32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, NSConv) for m in convs)
    assert all(name.endswith("weight") for name in prunable_weights(model))
    assert len(prunable_weights(model)) == len(convs) + sum(isinstance(m, nn.Linear) for m in model.modules())
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    batch = build_model(ModelConfig(arch=arch), 3, 10, 32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())


def test_nsconv_build_is_deterministic_and_conversion_keeps_weights():
    torch.manual_seed(3)
    a = build_model(ModelConfig(arch="cnn", norm="nsconv"), 1, 10, 28)
    torch.manual_seed(3)
    b = build_model(ModelConfig(arch="cnn", norm="nsconv"), 1, 10, 28)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    plain = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False))
    before = plain[0].weight.detach().clone()
    convert_to_nsconv(plain)
    assert isinstance(plain[0], NSConv) and torch.equal(plain[0].weight, before)
    assert torch.equal(plain[0].bias, torch.zeros(3)) and torch.equal(plain[0].gain, torch.full((3,), GAIN_INIT))


def test_attach_masks_makes_the_effective_weight_sparse():
    torch.manual_seed(4)
    model = build_model(ModelConfig(arch="cnn", norm="nsconv"), 1, 10, 28)
    masks = {name: (torch.rand_like(w) < 0.3).float() for name, w in prunable_weights(model).items()}
    assert attach_masks(model, masks) == 2  # conv1, conv2 (the Linear layers are plain)
    w_hat = model.conv1.standardized_weight()
    assert torch.equal(w_hat != 0, masks["conv1.weight"].bool() & (w_hat != 0))
    assert int((w_hat != 0).sum()) == int(masks["conv1.weight"].sum())
    attach_masks(model, None)
    assert model.conv1.weight_mask is None


@pytest.mark.parametrize("gamma", [None, 0.5])
def test_recorded_effective_grad_is_the_per_weight_gradient_of_w_hat(gamma):
    """Growth scores: dL/dW_hat (one value per position, masked ones too) from the same backward; the
    raw-weight gradients of the recording pass equal the fused path's, with and without SAP."""
    from fedmef_core.models.nsconv import effective_grads, recording_effective_grads
    from fedmef_core.sap import sparsify

    torch.manual_seed(2)
    model = nn.Sequential(NSConv(3, 5, 3, padding=1, bias=True))
    conv = model[0]
    mask = torch.rand_like(conv.weight) > 0.7
    with torch.no_grad():
        conv.weight.mul_(mask)  # as the pruning code keeps them: masked raw weights are 0
    attach_masks(model, {"0.weight": mask})
    if gamma is not None:
        apply_sap(model, SapConfig(gamma=gamma, value_dtype="float32", positions="index"))
    x = torch.randn(4, 3, 6, 6)
    grad_out = torch.randn(4, 5, 6, 6)

    model(x).backward(grad_out)
    fused = [p.grad.clone() for p in (conv.weight, conv.gain, conv.bias)]
    model.zero_grad()
    with recording_effective_grads(model):
        model(x).backward(grad_out)
        got = effective_grads(model)
    assert conv.effective_grad is None and not conv.record_effective_grad  # switched off again
    for a, b in zip([conv.weight.grad, conv.gain.grad, conv.bias.grad], fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # reference: the weight gradient of a plain conv with weight W_hat (SAP: from the pruned input)
    w_hat = conv.standardized_weight().detach().requires_grad_(True)
    x_saved = x if gamma is None else sparsify(x, gamma)
    F.conv2d(x_saved, w_hat, conv.bias.detach(), 1, 1).backward(grad_out)
    torch.testing.assert_close(got["0.weight"], w_hat.grad, rtol=1e-5, atol=1e-6)
    inactive = got["0.weight"][~mask]
    assert inactive.unique().numel() == inactive.numel()  # the raw gradient ties per output channel
    assert conv.weight.grad[~mask].unique().numel() <= conv.out_channels
