"""Model registry: ``build_model(name, ...)`` returns ``Normalize(mean, std)`` + network.

Every registered model takes [0, 1] pixels; the dataset's mean and std live inside the model, so
perturbation budgets are always in pixel units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from robustlab.errors import ConfigError
from robustlab.models.efficientnet import efficientnet_b0
from robustlab.models.fused import fused_classifier, fused_copy
from robustlab.models.normalize import Normalize, NormalizedModel
from robustlab.models.resnet import WideResNet, preact_resnet18, resnet18
from robustlab.models.small import LeNet5, SmallCNN

__all__ = ["MODELS", "Normalize", "NormalizedModel", "build_model", "fused_classifier", "fused_copy",
           "validate_model_name"]


def _wide_resnet(num_classes: int, in_channels: int, image_size: int, depth: int | None, width: int | None):
    return WideResNet(depth or 28, width or 10, num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "small_cnn": SmallCNN,
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wide_resnet": _wide_resnet,
    "efficientnet_b0": efficientnet_b0,
}


#: Models whose ``width`` is the first stage's (stem's) channel count (the others take no width, or a widening factor).
WIDTH_MODELS = ("resnet18", "preact_resnet18", "efficientnet_b0")


def validate_model_name(name: str) -> None:
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; valid: {', '.join(MODELS)}")


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    depth: int | None = None,
    width: int | None = None,
) -> NormalizedModel:
    """Instantiate a registered architecture behind a ``Normalize`` layer (identity when mean/std absent)."""
    validate_model_name(name)
    factory = MODELS[name]
    if name == "wide_resnet":
        net = factory(num_classes, in_channels, image_size, depth, width)
    elif name in WIDTH_MODELS:
        net = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
    else:
        net = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    mean = mean if mean is not None else [0.0] * in_channels
    std = std if std is not None else [1.0] * in_channels
    return NormalizedModel(net, mean, std)
