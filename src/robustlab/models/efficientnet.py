"""EfficientNet-B0 (Tan & Le 2019) from torchvision, adapted to small images and any class count."""

from __future__ import annotations

from torch import nn
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

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
    # torchvision's own B0 stage table (Tan & Le 2019, Table 1), scaled as its B1-B7 builders scale it
    stages, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=width_mult, depth_mult=1.0)
    model = EfficientNet(stages, dropout=0.2, last_channel=last_channel, num_classes=num_classes)
    stem = model.features[0][0]
    stride = 1 if image_size <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model
