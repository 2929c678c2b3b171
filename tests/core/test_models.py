"""Model builders: shapes, sizes, CIFAR adaptations, prunable weights, determinism, backward."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from fedmef_core.config import ModelConfig
from fedmef_core.models import (
    ARCHITECTURES,
    build_model,
    count_parameters,
    norm_layer,
    prunable_weights,
)

ARCHS = ["cnn", "resnet8", "resnet18", "mobilenetv2"]
# Conv2d + Linear layers, counted by hand from the architectures:
# cnn 2 conv + 2 fc; resnet18 1 stem + 16 block convs + 3 downsample + fc;
# mobilenetv2 stem + (2 convs in the t=1 block) + 16 blocks x 3 convs + last 1x1 conv + fc.
EXPECTED_PRUNABLE_LAYERS = {"cnn": 4, "resnet8": 1 + 6 + 2 + 1, "resnet18": 21, "mobilenetv2": 1 + 2 + 16 * 3 + 1 + 1}


def _build(arch: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch), in_channels, num_classes, image_size)


@pytest.mark.parametrize(
    ("arch", "in_channels", "size", "num_classes"),
    [
        ("cnn", 1, 28, 10),
        ("cnn", 3, 32, 10),
        ("resnet8", 1, 28, 10),
        ("resnet18", 3, 32, 10),
        ("resnet18", 1, 28, 7),
        ("mobilenetv2", 3, 32, 100),
        ("mobilenetv2", 1, 28, 10),
    ],
)
def test_output_shape_and_in_channels(arch, in_channels, size, num_classes):
    model = _build(arch, in_channels, num_classes, size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels


def test_cnn_layout_and_size():
    model = _build("cnn", 1, 10, 28)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (3, 3)),
        (32, 64, (3, 3)),
    ]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(64 * 7 * 7, 128), (128, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


def test_cnn_output_is_contiguous():
    # channels-last is used internally; callers must still get an ordinary tensor
    out = _build("cnn", 3, 10, 32)(torch.randn(2, 3, 32, 32))
    assert out.is_contiguous()


def test_resnet18_is_the_cifar_variant():
    model = _build("resnet18", 3, 10, 32)
    total = count_parameters(model)["total"]
    assert abs(total - 11.17e6) / 11.17e6 < 0.01, total
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    widths = [getattr(model, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)]
    assert widths == [64, 128, 256, 512]
    # 32x32 in, 4x4 before the global pool (three stride-2 stages only)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    assert x.shape == (2, 512, 4, 4)


def test_mobilenetv2_is_the_cifar_variant():
    model = _build("mobilenetv2", 3, 10, 32).eval()
    stem = model.features[0][0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.features[:4](x)
        assert x.shape == (2, 24, 32, 32)  # the 24-channel stage keeps the resolution
        x = model.features[4:](x)
    assert x.shape == (2, 1280, 4, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_prunable_weights_are_exactly_conv_and_linear_weights(arch):
    model = _build(arch)
    expected = [
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    assert len(expected) == EXPECTED_PRUNABLE_LAYERS[arch]

    weights = prunable_weights(model)
    assert list(weights) == expected  # same set, model order
    params = dict(model.named_parameters())
    for name, p in weights.items():
        assert p is params[name]
        assert p.dim() in (2, 4)
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert norm_params  # the models do have norm parameters ...
    assert not norm_params & {id(p) for p in weights.values()}  # ... and none of them is prunable
    assert not any(name.endswith("bias") for name in weights)

    counts = count_parameters(model)
    assert counts["prunable"] == sum(p.numel() for p in weights.values())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["prunable"] < counts["total"]


@pytest.mark.parametrize("arch", ARCHS)
def test_builders_use_the_norm_factory_only(arch):
    class Marker(nn.GroupNorm):
        def __init__(self, num_channels: int) -> None:
            super().__init__(1, num_channels)

    model = ARCHITECTURES[arch].load()(3, 10, 32, Marker)
    assert any(isinstance(m, Marker) for m in model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert norm_layer(ModelConfig(norm="batch")) is nn.BatchNorm2d


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_and_only_torch_rng_used(arch):
    random.seed(1)
    np.random.seed(1)
    py_state, np_state = random.getstate(), np.random.get_state()
    a = _build(arch, seed=3).state_dict()
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    b = _build(arch, seed=3).state_dict()
    c = _build(arch, seed=4).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_every_parameter(arch):
    model = _build(arch).train()
    # the same input shape as the other tests: oneDNN's per-shape set-up dominates CPU time here
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in prunable_weights(model).values())


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(ModelConfig.model_construct(arch="vgg", norm="batch"), 3, 10, 32)
