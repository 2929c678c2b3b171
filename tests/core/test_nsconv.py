import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core.config import ModelConfig, SapConfig
from fedmef_core.models import build_model, prunable_weights
from fedmef_core.models.nsconv import (
    GAIN_INIT,
    MIN_CENTRED,
    NSConv,
    attach_masks,
    centre_active,
    convert_to_nsconv,
    grow_at_channel_mean,
    standardize,
)
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


def test_constant_channel_uses_eps_and_a_mask_standardizes_over_the_kept_weights_only():
    w = torch.ones(2, 1, 2, 2)
    assert torch.equal(standardize(w, torch.ones(2)), torch.zeros(2, 1, 2, 2))  # no division by zero
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3)
    mask = torch.zeros_like(w)
    mask.flatten(1)[:, :5] = 1
    w_hat = standardize(w, torch.ones(3), mask).flatten(1)
    assert torch.equal(w_hat[:, 5:], torch.zeros(3, 13))
    # the kept weights alone, standardized as a dense channel of 5 weights
    dense = standardize(w.flatten(1)[:, :5].reshape(3, 5, 1, 1), torch.ones(3)).flatten(1)
    torch.testing.assert_close(w_hat[:, :5], dense)
    assert torch.equal(standardize(w, torch.ones(3), torch.ones_like(w)) != 0, standardize(w, torch.ones(3)) != 0)


def test_a_channel_with_too_few_active_weights_is_scaled_but_not_centred():
    w = torch.tensor([[0.5, -2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]).view(2, 4, 1, 1)
    mask = (w != 0).float()
    w_hat = standardize(w, torch.ones(2), mask).flatten(1)
    assert MIN_CENTRED > 2
    torch.testing.assert_close(w_hat[1], torch.tensor([1.0, 0, 0, 0]))  # one weight keeps its sign, |W_hat| = g
    torch.testing.assert_close(w_hat[0, :2], torch.tensor([0.5, -2.0]) / (0.5**2 + 2.0**2) ** 0.5)


def _channel_mean_shift(conv: NSConv) -> float:
    """Mean over the output channels of |mean| / std of the conv's output on a ReLU'd unit Gaussian input
    (what a conv after a ReLU sees: every input channel with the same positive mean)."""
    torch.manual_seed(1)
    x = torch.relu(torch.randn(64, conv.in_channels, 12, 12))
    with torch.no_grad():
        o = (conv(x) - conv.bias.view(1, -1, 1, 1)).transpose(0, 1).flatten(1)
    return (o.mean(1).abs() / o.std(1)).mean().item()


@pytest.mark.parametrize("density", [0.05, 0.1])
def test_a_sparse_nsconv_centres_its_channels_as_a_dense_one_does(density):
    """The property on outputs: with the statistics over the whole fan-in (pruned zeros included) a sparse
    conv's active weights do not sum to zero, so a positive input mean (a ReLU's) shifts every output
    channel (0.50 std at FedMef's d = 0.05 on the CNN's conv2, against 0.03 dense); over the kept
    weights its channels are as centred as a dense conv's."""
    from fedmef_core.algorithms import build_algorithm
    from fedmef_core.config import ExperimentConfig

    config = ExperimentConfig.model_validate({"pruning": {"method": "fedmef", "density": density}})
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", norm="nsconv"), 1, 10, 28)
    dense_shift = _channel_mean_shift(model.conv2)
    state = build_algorithm(config).init_server_state(model, torch.Generator().manual_seed(0))
    assert state.masks["conv2.weight"].float().mean() < density  # ERK: the big conv is the sparsest
    attach_masks(model, state.masks)
    sparse_shift = _channel_mean_shift(model.conv2)
    assert dense_shift < 0.05
    assert sparse_shift < 0.1, (sparse_shift, dense_shift)


def _off_centre_sparse_conv(seed: int, density: float, offset: float) -> tuple[nn.Module, NSConv, torch.Tensor]:
    """A one-NSConv model whose kept raw weights are shifted off-centre by `offset` (as aggregation may leave
    them), masked outside a random mask of `density` that is attached; returns (model, conv, mask)."""
    torch.manual_seed(seed)
    model = nn.Sequential(NSConv(8, 4, 3))
    conv = model[0]
    mask = torch.rand_like(conv.weight) < density
    with torch.no_grad():
        conv.weight.add_(offset).mul_(mask)
    attach_masks(model, {"0.weight": mask})
    return model, conv, mask


def test_a_grown_weight_enters_at_zero_and_leaves_its_channel_unchanged():
    model, conv, old = _off_centre_sparse_conv(6, 0.3, 0.3)
    before = conv.standardized_weight().detach().clone()
    new = old.clone()
    grown = torch.zeros_like(old)
    for c in range(4):  # one inactive position per channel becomes active, at raw value 0 as growth leaves it
        i = int((~old[c].flatten()).nonzero()[0])
        grown[c].view(-1)[i] = True
    new |= grown
    grow_at_channel_mean(model, {"0.weight": old}, {"0.weight": new})
    attach_masks(model, {"0.weight": new})
    after = conv.standardized_weight().detach()
    torch.testing.assert_close(after[grown], torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(after[old], before[old], atol=1e-6, rtol=1e-5)


def test_centring_the_initial_sparse_model_leaves_w_hat_unchanged():
    model, conv, mask = _off_centre_sparse_conv(7, 0.4, 0.5)
    before = conv.standardized_weight().detach().clone()
    centre_active(model, {"0.weight": mask})
    torch.testing.assert_close(conv.standardized_weight().detach(), before, atol=1e-6, rtol=1e-5)
    kept = conv.weight.detach().flatten(1)
    torch.testing.assert_close(kept.sum(1), torch.zeros(4), atol=1e-5, rtol=0)
    assert torch.equal(kept != 0, mask.flatten(1))


def _block_stds(arch: str, norm: str) -> tuple[list[float], float]:
    import torchvision

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, norm=norm), 3, 10, 32).train()
    kinds = (torchvision.models.resnet.BasicBlock, torchvision.models.mobilenetv2.InvertedResidual)
    stds: list[float] = []
    for block in (m for m in model.modules() if isinstance(m, kinds)):
        block.register_forward_hook(lambda m, i, o: stds.append(o.std().item()))
    with torch.no_grad():
        logits = model(torch.randn(16, 3, 32, 32))
    return stds, logits.std().item()


@pytest.mark.parametrize("arch", ["resnet8", "resnet18", "mobilenetv2"])
def test_nsconv_residual_networks_keep_their_scale_at_initialisation(arch):
    """Without BatchNorm nothing rescales a residual stream: with every branch at NSConv's own gain its std
    grew x9.0 across ResNet18's blocks (logits std 5.1), x1.9 across ResNet8's and x4.3 across MobileNetV2's.
    As with BatchNorm it must stay within a small factor, and the logits small."""
    stds, logits = _block_stds(arch, "nsconv")
    batch_stds, batch_logits = _block_stds(arch, "batch")
    assert max(stds) / min(stds) < max(1.75, 1.3 * max(batch_stds) / min(batch_stds)), (stds, batch_stds)
    assert logits < 1.0 and batch_logits < 1.0


def test_residual_branches_start_at_unit_scale_without_touching_the_global_rng():
    from fedmef_core.models.layers import residual_branch_ends

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", norm="nsconv"), 3, 10, 32)
    after_build = torch.rand(1)
    ends = residual_branch_ends(model)
    assert len(ends) == 8 + 3  # one per BasicBlock, one per projection shortcut
    outs: list[torch.Tensor] = []
    for conv in ends:
        conv.register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    assert all(0.5 < o.std().item() < 2.0 for o in outs), [round(o.std().item(), 2) for o in outs]
    torch.manual_seed(0)
    build_model(ModelConfig(arch="resnet18", norm="batch"), 3, 10, 32)
    assert torch.equal(torch.rand(1), after_build)  # the calibration draws from its own generator


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


@pytest.mark.parametrize("arch", ["cnn", "resnet8", "resnet18", "mobilenetv2"])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (64, 32, 3, 3), (10, 7)])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_the_fused_sparse_standardisation_gives_autograds_bits(dtype, shape, density):
    """_SparseStandardize must compute exactly what the plain autograd form computes (results bit for bit)."""
    from fedmef_core.models.nsconv import _SparseStandardize, standardize_reference

    g = torch.Generator().manual_seed(shape[0] * 100 + int(density * 10))
    w = torch.randn(shape, generator=g, dtype=dtype) * 0.1 + 0.01
    mask = (torch.rand(shape, generator=g) < density).to(dtype)
    mask[0] = 0  # a channel with nothing active, one with a single weight (not centred)
    mask[1].view(-1)[:] = 0
    mask[1].view(-1)[0] = 1
    gain = torch.rand(shape[0], generator=g, dtype=dtype) + 0.5
    grad = torch.randn(shape, generator=g, dtype=dtype)
    results = []
    for fn in (_SparseStandardize.apply, standardize_reference):
        wl, gl = w.clone().requires_grad_(True), gain.clone().requires_grad_(True)
        out = fn(wl, gl, mask, 1e-5)
        out.backward(grad)
        results.append((out.detach(), wl.grad, gl.grad))
    for got, want, what in zip(*results, ("W_hat", "weight grad", "gain grad")):
        assert got.dtype == want.dtype and torch.equal(got, want), what
    assert standardize(w, gain, mask) is not None  # the public entry point takes the fused path on CPU
