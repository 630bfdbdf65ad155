"""EfficientNet-B0 (Tan & Le 2019) from torchvision, adapted to small images and any class count."""

from __future__ import annotations

from torch import nn
from torchvision.models import efficientnet_b0 as tv_efficientnet_b0


def efficientnet_b0(num_classes: int = 10, in_channels: int = 3, image_size: int = 64) -> nn.Module:
    """Randomly initialised EfficientNet-B0; for images <= 64 px the stem stride is 1 instead of 2,
    keeping enough spatial resolution for 32-64 px inputs (no pretrained weights are downloaded)."""
    model = tv_efficientnet_b0(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    stride = 1 if image_size <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model
