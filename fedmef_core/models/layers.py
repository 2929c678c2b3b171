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


# Initial gain of the last NSConv of every residual branch, relative to NSConv's own (module doc of nsconv).
RESIDUAL_GAIN = 0.0


def finish_norm(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Called on every built model: with ``norm: nsconv`` every Conv2d becomes an NSConv (in place) and
    every residual branch starts silent (:func:`residual_branch_ends`)."""
    if cfg.norm == "nsconv":
        convert_to_nsconv(model)
        with torch.no_grad():
            for conv in residual_branch_ends(model):
                conv.gain.mul_(RESIDUAL_GAIN)
    return model


def residual_branch_ends(model: nn.Module) -> list[NSConv]:
    """The last NSConv of every residual branch (h + f(h)) of ``model``.

    Without BatchNorm nothing rescales a residual stream: each block adds a branch of about the stream's
    own variance, so the stream's std grows block by block (x9 over ResNet18's eight blocks at
    initialisation, logits std 5). Starting these convs' gains at ``RESIDUAL_GAIN`` = 0 makes every block
    the identity at initialisation (SkipInit, De & Smith, NeurIPS 2020; the zero-initialised residual gain
    of normaliser-free ResNets, Brock et al., ICLR 2021) and the learned per-channel gain opens each branch
    as training needs it. Folding the gain into NSConv's own costs no parameter and no saved activation.
    """
    ends: list[nn.Module] = []
    for block in model.modules():
        if isinstance(block, BasicBlock):
            ends.append(block.conv2)
        elif isinstance(block, Bottleneck):
            ends.append(block.conv3)
        elif isinstance(block, InvertedResidual) and block.use_res_connect:
            ends.append(block.conv[-2])  # the 1x1 projection (conv[-1] is the norm slot)
    return [c for c in ends if isinstance(c, NSConv)]


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
