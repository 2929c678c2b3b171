"""CIFAR ResNets: ResNet18 (the paper's) and ResNet8 (its family at a size a CPU trains in minutes).

ResNet18, changes to ``torchvision.models.resnet18``:
- ``conv1``: 7x7 stride-2 (3 input channels) -> 3x3 stride-1 padding-1 with ``in_channels`` inputs;
- ``maxpool``: removed (``nn.Identity``).
Everything else (4 stages 64-128-256-512, adaptive average pool, FC) is torchvision's.
About 11.17M parameters for 10 classes.

ResNet8: the same design (3x3 stem, torchvision's ``BasicBlock``, 1x1 projection shortcuts, adaptive
average pool, FC) with one block in each of three stages of 16-32-64 channels (He et al.'s CIFAR widths):
1 + 3 x 2 + 1 = 8 weighted layers, about 78k parameters, a few seconds an epoch of 6,000 32x32 images on
two CPU cores. Its blocks are torchvision's, so what holds for NSConv ResNet18's residual branches
(``layers.residual_branch_ends``) holds for it.
"""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from fedmef_core.models.layers import NormFactory, conv3x3, init_conv_like_torchvision

RESNET8_WIDTHS = (16, 32, 64)


def resnet18(in_channels: int, num_classes: int, image_size: int, norm: NormFactory) -> nn.Module:
    del image_size  # the adaptive pool makes the network size-agnostic
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, norm_layer=norm)
    model.conv1 = conv3x3(in_channels, 64)
    init_conv_like_torchvision(model.conv1)
    model.maxpool = nn.Identity()
    return model


class ResNet8(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, norm: NormFactory) -> None:
        super().__init__()
        first = RESNET8_WIDTHS[0]
        self.conv1, self.bn1, self.relu = conv3x3(in_channels, first), norm(first), nn.ReLU(inplace=True)
        blocks, width = [], first
        for i, out in enumerate(RESNET8_WIDTHS):
            stride = 1 if i == 0 else 2
            shortcut = None
            if stride != 1 or out != width:
                shortcut = nn.Sequential(nn.Conv2d(width, out, 1, stride=stride, bias=False), norm(out))
            blocks.append(BasicBlock(width, out, stride, shortcut, norm_layer=norm))
            width = out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_like_torchvision(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet8(in_channels: int, num_classes: int, image_size: int, norm: NormFactory) -> nn.Module:
    del image_size
    return ResNet8(in_channels, num_classes, norm)
