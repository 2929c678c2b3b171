"""A small two-conv CNN: the fast CPU default for 28x28 (or 32x32) images."""

from __future__ import annotations

import torch
from torch import nn

from fedmef_core.models.layers import NormFactory, conv3x3


class SmallCNN(nn.Module):
    """conv3x3(in->32)-norm-ReLU-maxpool2, conv3x3(32->64)-norm-ReLU-maxpool2, flatten,
    Linear(64*s*s -> 128)-ReLU, Linear(128 -> num_classes), with ``s = image_size // 4``.

    Activations after the first conv are kept in channels-last layout: on CPU, max-pooling an NCHW
    tensor is about 5x slower than an NHWC one, and this makes a training step ~40% faster. Only the
    memory layout changes (weights and the output stay in the default layout); the values equal the
    NCHW computation's up to float rounding, and are deterministic.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, norm: NormFactory) -> None:
        super().__init__()
        s = image_size // 4
        if s < 1:
            raise ValueError(f"image_size must be at least 4 for the CNN, got {image_size}")
        self.conv1 = conv3x3(in_channels, 32)
        self.norm1 = norm(32)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = conv3x3(32, 64)
        self.norm2 = norm(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * s * s, 128)
        self.relu3 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).contiguous(memory_format=torch.channels_last)
        x = self.pool1(self.relu1(self.norm1(x)))
        x = self.pool2(self.relu2(self.norm2(self.conv2(x))))
        x = torch.flatten(x, 1)  # logical (C, H, W) order whatever the memory layout
        return self.fc2(self.relu3(self.fc1(x)))


def cnn(in_channels: int, num_classes: int, image_size: int, norm: NormFactory) -> nn.Module:
    return SmallCNN(in_channels, num_classes, image_size, norm)
