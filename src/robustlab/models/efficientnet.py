"""EfficientNet-B0 (Tan & Le 2019) from torchvision, adapted to small images and any class count."""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

#: B0's stem width; ``width`` scales every stage from it, like torchvision's ``width_mult`` for B1-B7.
EFFICIENTNET_B0_WIDTH = 32


def efficientnet_b0(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 64, width: int | None = None
) -> nn.Module:
    """Randomly initialised EfficientNet-B0; for images <= 64 px the stem stride is 1 instead of 2,
    keeping enough spatial resolution for 32-64 px inputs (no pretrained weights are downloaded).

    ``width`` is the stem's channel count (32 = B0 itself); every stage scales by ``width / 32`` (rounded
    to multiples of 8 as in the paper's compound scaling, Tan & Le 2019 eq. 3), depth and kernels unchanged:
    the same network shape at a fraction of the compute, for CPU profiles.
    """
    width_mult = (width or EFFICIENTNET_B0_WIDTH) / EFFICIENTNET_B0_WIDTH
    stage = partial(MBConvConfig, width_mult=width_mult, depth_mult=1.0)
    stages = [  # Tan & Le 2019, Table 1: expand ratio, kernel, stride, in, out, layers
        stage(1, 3, 1, 32, 16, 1),
        stage(6, 3, 2, 16, 24, 2),
        stage(6, 5, 2, 24, 40, 2),
        stage(6, 3, 2, 40, 80, 3),
        stage(6, 5, 1, 80, 112, 3),
        stage(6, 5, 2, 112, 192, 4),
        stage(6, 3, 1, 192, 320, 1),
    ]
    model = EfficientNet(stages, dropout=0.2, num_classes=num_classes)
    stem = model.features[0][0]
    stride = 1 if image_size <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model
