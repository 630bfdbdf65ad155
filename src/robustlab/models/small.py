"""Small MNIST-scale networks: LeNet-5 (LeCun et al. 1998) and the MNIST CNN of Madry et al. (2018)."""

from __future__ import annotations

import torch
from torch import nn


def _flat_features(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, image_size, image_size)).numel())


class LeNet5(nn.Module):
    """Classic LeNet-5: conv(6,5x5) - pool - conv(16,5x5) - pool - fc120 - fc84 - fc(num_classes).

    The first convolution pads by 2 (the usual 28x28 -> 32x32 adaptation); images smaller than 20
    pixels (the 8x8 ``digits``) also pad the second convolution so the feature map never vanishes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        second_pad = 2 if image_size < 20 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=second_pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, in_channels, image_size), 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """The MNIST CNN of Madry et al. (2018): conv32-conv64 (5x5, max-pool) - fc1024. (TRADES' MNIST
    SmallCNN is another network: four 3x3 convolutions, then two fully connected layers of 200.)"""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, in_channels, image_size), 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
