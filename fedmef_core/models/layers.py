"""Building blocks shared by every architecture.

The normalisation choice lives here and nowhere else: each builder asks :func:`norm_layer` for a
constructor ``norm(num_features) -> nn.Module`` and uses it for every norm layer it creates.
A new option (e.g. NSConv, which replaces BatchNorm) is added in this module only.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedmef_core.config import ModelConfig
from fedmef_core.models.nsconv import convert_to_nsconv

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


def finish_norm(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Called on every built model: with ``norm: nsconv`` every Conv2d becomes an NSConv (in place)."""
    if cfg.norm == "nsconv":
        convert_to_nsconv(model)
    return model


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
