"""Model builders (CNN, CIFAR ResNet8/ResNet18, CIFAR MobileNetV2: entries of `fedmef_core.registry.ARCHITECTURES`)
and the prunable-weight view of a model."""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch import nn

from fedmef_core.config import ModelConfig
from fedmef_core.models.cnn import SmallCNN
from fedmef_core.models.layers import NormFactory, finish_norm, is_prunable, norm_layer
from fedmef_core.registry import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "NormFactory",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "is_prunable",
    "norm_layer",
    "prunable_weights",
]

Builder = Callable[[int, int, int, NormFactory], nn.Module]  # what an entry of registry.ARCHITECTURES names


# Initial weights come from torch's one process-wide RNG: builds in parallel threads (a sweep's cells) take
# turns, and a caller that seeds first holds GLOBAL_RNG across seeding and building.
GLOBAL_RNG = threading.RLock()


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model. Weights come from the global torch RNG only (the caller seeds it)."""
    builder: Builder = ARCHITECTURES[cfg.arch].load()  # an unknown name: one ValueError naming them all
    with GLOBAL_RNG:
        model = builder(in_channels, num_classes, image_size, norm_layer(cfg))
        return finish_norm(model, cfg, (in_channels, image_size, image_size))


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``weight`` of every Conv2d and Linear layer, keyed by its name in ``model.named_parameters()``.

    Ordered as ``named_parameters()`` orders them; biases and norm parameters are excluded.
    """
    wanted = {id(m.weight) for m in model.modules() if is_prunable(m) and m.weight is not None}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": all parameters, "prunable": those in prunable_weights}`` (element counts)."""
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(p.numel() for p in prunable_weights(model).values())
    return {"total": total, "prunable": prunable}
