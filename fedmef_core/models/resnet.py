"""CIFAR ResNet18: torchvision's ResNet18 with a 3x3 stride-1 stem and no max-pool.

Changes to ``torchvision.models.resnet18``:
- ``conv1``: 7x7 stride-2 (3 input channels) -> 3x3 stride-1 padding-1 with ``in_channels`` inputs;
- ``maxpool``: removed (``nn.Identity``).
Everything else (4 stages 64-128-256-512, adaptive average pool, FC) is torchvision's.
About 11.17M parameters for 10 classes.
"""

from __future__ import annotations

import torchvision
from torch import nn

from fedmef_core.models.layers import NormFactory, conv3x3, init_conv_like_torchvision


def resnet18(in_channels: int, num_classes: int, image_size: int, norm: NormFactory) -> nn.Module:
    del image_size  # the adaptive pool makes the network size-agnostic
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, norm_layer=norm)
    model.conv1 = conv3x3(in_channels, 64)
    init_conv_like_torchvision(model.conv1)
    model.maxpool = nn.Identity()
    return model
