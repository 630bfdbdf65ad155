"""ResNet-18 and PreAct ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) and WideResNet.

ResNet: He et al. 2016; pre-activation: He et al. 2016b; WideResNet: Zagoruyko & Komodakis 2016
(depth = 6n + 4, the WRN-34-10 / WRN-28-10 of adversarial-training papers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class ResNet(nn.Module):
    """A four-stage residual network with a 3x3 stem suited to 32x32 (and smaller) images."""

    def __init__(
        self,
        block: type[nn.Module],
        blocks_per_stage: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        preact: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if preact else nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, (count, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(in_planes) if preact else nn.Identity()
        self.preact = preact
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        if not self.preact:
            out = F.relu(self.stem_bn(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


#: Channels of ResNet-18's first stage; each later stage doubles them (64, 128, 256, 512).
RESNET18_WIDTH = 64


def _stage_widths(width: int | None) -> list[int]:
    """ResNet-18's four stage widths scaled from the first one (``width``, default 64): same depth, same shape."""
    base = RESNET18_WIDTH if width is None else width
    return [base, 2 * base, 4 * base, 8 * base]


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> ResNet:
    """ResNet-18 (CIFAR stem); ``width`` sets the first stage's channels (64 = the original, 16 = a quarter)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], _stage_widths(width), num_classes, in_channels)


def preact_resnet18(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None
) -> ResNet:
    """PreAct ResNet-18 (CIFAR stem); ``width`` as for :func:`resnet18`."""
    return ResNet(PreActBlock, [2, 2, 2, 2], _stage_widths(width), num_classes, in_channels, preact=True)


class WideResNet(nn.Module):
    """WRN-depth-width with pre-activation blocks (three stages of (depth - 4) / 6 blocks)."""

    def __init__(
        self, depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wide_resnet depth must be 6n + 4 (e.g. 16, 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths[1:]):
            for i in range(n):
                layers.append(PreActBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1, dropout))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
