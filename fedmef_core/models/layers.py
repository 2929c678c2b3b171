"""Building blocks shared by every architecture.

The normalisation choice lives here and nowhere else: each builder asks :func:`norm_layer` for a
constructor ``norm(num_features) -> nn.Module`` and uses it for every norm layer it creates.
A new option (e.g. NSConv, which replaces BatchNorm) is added in this module only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from fedmef_core.config import ModelConfig
from fedmef_core.models.nsconv import NSConv, convert_to_nsconv

NormFactory = Callable[[int], nn.Module]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def norm_layer(cfg: ModelConfig) -> NormFactory:
    """The constructor of the normalisation layer selected by ``cfg.norm``. An experiment's config has
    resolved ``auto`` to its method's norm; a bare ``ModelConfig()`` (no method to ask) means BatchNorm."""
    if cfg.norm in ("batch", "auto"):
        return nn.BatchNorm2d
    if cfg.norm == "nsconv":
        return _identity
    raise ValueError(f"unknown norm {cfg.norm!r}")


def _identity(num_features: int) -> nn.Module:
    return nn.Identity()


CALIBRATION_BATCH = 4  # random images the initial NSConv residual branches are scaled on (residual_branch_ends)


def finish_norm(model: nn.Module, cfg: ModelConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """Called on every built model: with ``norm: nsconv`` every Conv2d becomes an NSConv (in place) and every
    residual branch starts at BatchNorm's scale (:func:`scale_residual_branches`)."""
    if cfg.norm == "nsconv":
        convert_to_nsconv(model)
        scale_residual_branches(model, input_shape)
    return model


def residual_branch_ends(model: nn.Module) -> list[NSConv]:
    """The NSConv whose output is added to a residual stream: the last conv of every residual branch (h + f(h))
    and the projection of every shortcut that has one, in forward order."""
    ends: list[nn.Module] = []
    for block in model.modules():
        if isinstance(block, BasicBlock | Bottleneck):
            ends.append(block.conv3 if isinstance(block, Bottleneck) else block.conv2)
            if block.downsample is not None:
                ends.append(block.downsample[0])
        elif isinstance(block, InvertedResidual) and block.use_res_connect:
            ends.append(block.conv[-2])  # the 1x1 projection (conv[-1] is the norm slot)
    return [c for c in ends if isinstance(c, NSConv)]


def scale_residual_branches(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Give every residual branch (and projection shortcut) of an NSConv model unit output std at
    initialisation, as BatchNorm's last layer in the branch does.

    Without BatchNorm nothing rescales a residual stream: an NSConv branch's output scales with its input,
    so each block doubles the stream's variance (std x9 over ResNet18's eight blocks, logits std 5). One
    forward pass of ``CALIBRATION_BATCH`` random images (a fixed generator: the global RNG is not touched)
    divides each branch end's gain by the std of its output, in forward order, so every later block sees
    the calibrated stream; the stream then grows as a BatchNorm ResNet's does (the variance adds ~1 per block,
    reset at each shortcut projection). Measured (README): a zero-initialised branch gain (SkipInit) or NF-ResNets'
    fixed alpha = 0.2 keep the scale too but learned ResNet8 markedly slower at the same learning rate.
    """
    def calibrate(conv: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        std = float(out.std())
        if std > 0:
            conv.gain.div_(std)
            out = out / std  # the bias is 0 at initialisation: this is the calibrated conv's output
        return out

    ends = residual_branch_ends(model)
    if not ends:
        return
    hooks = [conv.register_forward_hook(calibrate) for conv in ends]
    images = torch.randn(CALIBRATION_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()


def is_prunable(module: nn.Module) -> bool:
    """Conv2d and Linear layers (subclasses included) carry the prunable weights."""
    return isinstance(module, PRUNABLE_TYPES)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a norm layer follows it)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def init_conv_like_torchvision(conv: nn.Conv2d) -> None:
    """Re-initialise a replaced conv the way torchvision's ResNet/MobileNetV2 initialise theirs."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
