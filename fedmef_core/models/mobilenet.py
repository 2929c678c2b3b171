"""CIFAR MobileNetV2: torchvision's MobileNetV2 adapted to 32x32 inputs.

Changes to ``torchvision.models.mobilenet_v2`` (width 1.0):
- stem ``features[0]``: the 3x3 conv has stride 1 (torchvision: 2) and ``in_channels`` inputs;
- second stage (t=6, c=24, n=2): stride 1 (torchvision: 2), i.e. the inverted-residual setting's
  second row ``[6, 24, 2, 2]`` becomes ``[6, 24, 2, 1]``, as in common CIFAR variants.
The remaining three stride-2 stages (32, 64 and 160 channels) take 32x32 to a 4x4 final feature map
(torchvision on 32x32 would end at 1x1). Classifier: torchvision's Dropout(0.2) + Linear(1280, C).
"""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from fedmef_core.models.layers import NormFactory, init_conv_like_torchvision

# torchvision's setting [expansion t, channels c, repeats n, first stride s], second stage stride 2 -> 1.
CIFAR_INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
STEM_CHANNELS = 32


def mobilenetv2(in_channels: int, num_classes: int, image_size: int, norm: NormFactory) -> nn.Module:
    del image_size  # the adaptive pool makes the network size-agnostic
    model = torchvision.models.mobilenet_v2(
        weights=None,
        num_classes=num_classes,
        norm_layer=norm,
        inverted_residual_setting=CIFAR_INVERTED_RESIDUAL_SETTING,
    )
    stem = Conv2dNormActivation(
        in_channels, STEM_CHANNELS, kernel_size=3, stride=1, norm_layer=norm, activation_layer=nn.ReLU6
    )
    init_conv_like_torchvision(stem[0])
    model.features[0] = stem
    return model
