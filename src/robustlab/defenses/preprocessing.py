"""Input-transform defences as model wrappers (paper §2.2, "Input Preprocessing").

``Defended(model, transform)`` classifies ``model(transform(x))``. Each transform declares whether it
is ``differentiable`` (else attacks must use BPDA, Athalye et al. 2018) and whether it is ``random``
(else attacks must use EOT), so evaluation picks the adaptive attack automatically rather than
reporting the false robustness of obfuscated gradients.

Transforms, by name (``build_transform({"name": ..., **params}, channels)``):

- ``feature_squeezing`` (Xu et al. 2018): bit-depth reduction to ``bits`` bits, then a ``median`` x
  ``median`` median filter. Rounding has zero gradient almost everywhere: **not differentiable**.
- ``noise_injection``: additive Gaussian noise ``N(0, sigma^2)`` at train *and* test time, clipped to
  [0, 1]. **Random** (evaluate with EOT).
- ``autoencoder``: a small denoising convolutional autoencoder, the MagNet reformer (Meng & Chen
  2017), trained on clean and Gaussian-noised images to reconstruct the clean one (its
  :meth:`~InputTransform.training_loss`, added by the training loop). Differentiable and deterministic.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn


class InputTransform(nn.Module):
    """Base for preprocessing transforms: maps [0, 1] images to [0, 1] images of the same shape."""

    differentiable: bool = True
    random: bool = False

    def training_loss(self, x: torch.Tensor) -> torch.Tensor | None:
        """A loss that trains the transform's own parameters on a clean batch (None: nothing to train)."""
        return None


class Defended(nn.Module):
    """A classifier behind an input transform; exposes the transform's ``differentiable``/``random``."""

    def __init__(self, model: nn.Module, transform: InputTransform) -> None:
        super().__init__()
        self.model = model
        self.transform = transform

    @property
    def differentiable(self) -> bool:
        return bool(getattr(self.transform, "differentiable", True))

    @property
    def random(self) -> bool:
        return bool(getattr(self.transform, "random", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(x))

    def with_classifier(self, model: nn.Module) -> Defended:
        """The same transform in front of another classifier (attacks use it for a fused copy)."""
        return Defended(model, self.transform)


class FeatureSqueezing(InputTransform):
    """Bit-depth reduction + median smoothing (Xu et al. 2018, "Feature Squeezing", §3-4).

    A median over an even window takes the lower of the two middle values; the image is padded by
    replication so the output keeps its size.
    """

    differentiable = False

    def __init__(self, bits: int = 1, median: int = 2) -> None:
        super().__init__()
        self.bits = bits
        self.median = median

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        x = torch.round(x * levels) / levels
        if self.median <= 1:
            return x
        k = self.median
        padded = F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="replicate")
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)
        return windows.flatten(-2).median(dim=-1).values

    def extra_repr(self) -> str:
        return f"bits={self.bits}, median={self.median}"


class GaussianNoise(InputTransform):
    """Random noise injection: ``clip(x + N(0, sigma^2), 0, 1)`` on every call, in training and at test."""

    random = True

    def __init__(self, sigma: float = 0.2) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class DenoisingAutoencoder(InputTransform):
    """The MagNet reformer (Meng & Chen 2017): a small conv autoencoder mapping inputs back to the data.

    conv3x3(C->w) - ReLU - avgpool(pool) - conv3x3(w->w) - ReLU - upsample - conv3x3(w->C) - sigmoid. Trained
    (:meth:`training_loss`) to reconstruct clean images from clean and noisy copies,
    ``MSE(AE(x), x) + MSE(AE(x + N(0, noise^2)), x)``, so off-manifold perturbations are pulled back.
    ``pool=2`` is MagNet's MNIST reformer (a pooled bottleneck); ``pool=1`` its CIFAR-10 one (no pooling):
    a pooled bottleneck blurs natural images, which a classifier trained on clean images then misreads.
    """

    def __init__(self, channels: int = 1, width: int = 16, noise: float = 0.1, pool: int = 2) -> None:
        super().__init__()
        self.noise = noise
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(pool) if pool > 1 else nn.Identity(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.decoder = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encoder(x)
        if code.shape[-2:] != x.shape[-2:]:
            code = F.interpolate(code, size=x.shape[-2:], mode="nearest")
        return torch.sigmoid(self.decoder(code))

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        noisy = (x + self.noise * torch.randn_like(x)).clamp(0.0, 1.0)
        return F.mse_loss(self(torch.cat([x, noisy])), torch.cat([x, x]))


class _TransformParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSqueezingParams(_TransformParams):
    name: Literal["feature_squeezing"] = "feature_squeezing"
    bits: int = Field(default=1, ge=1, le=8, description="bit depth kept (Xu et al.: 1 for MNIST)")
    median: int = Field(default=2, ge=1, le=7, description="median window (1: no smoothing)")


class NoiseInjectionParams(_TransformParams):
    name: Literal["noise_injection"] = "noise_injection"
    sigma: float = Field(default=0.2, gt=0.0, le=1.0, description="std of the Gaussian noise, in pixels")


class AutoencoderParams(_TransformParams):
    name: Literal["autoencoder"] = "autoencoder"
    width: int = Field(default=16, ge=1, le=256, description="feature maps of the autoencoder")
    noise: float = Field(default=0.1, ge=0.0, le=1.0, description="std of the training noise")
    pool: int = Field(default=2, ge=1, le=4,
                      description="bottleneck downsampling (MagNet: 2 for MNIST, 1 for CIFAR-10)")


TRANSFORMS: dict[str, type[_TransformParams]] = {
    "feature_squeezing": FeatureSqueezingParams,
    "noise_injection": NoiseInjectionParams,
    "autoencoder": AutoencoderParams,
}


def validate_transform(spec: dict[str, Any]) -> _TransformParams:
    """Validate ``{"name": ..., **params}``; raises ValueError with one line naming the bad field."""
    if not isinstance(spec, dict) or spec.get("name") not in TRANSFORMS:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise ValueError(f"unknown input transform {name!r}; valid: {', '.join(TRANSFORMS)}")
    params = TRANSFORMS[spec["name"]]
    try:
        return params.model_validate(spec)
    except ValidationError as error:
        item = error.errors()[0]
        field = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            raise ValueError(
                f"unknown parameter '{field}' for transform {spec['name']!r}; allowed: "
                f"{', '.join(f for f in params.model_fields if f != 'name')}"
            ) from None
        raise ValueError(f"{field}: {item['msg']}") from None


def _warn_mnist_setting(message: str) -> None:
    """A transform's MNIST default met colour images: say so at the caller of :func:`build_transform`."""
    warnings.warn(message, UserWarning, stacklevel=3)


def build_transform(spec: dict[str, Any], channels: int = 1) -> InputTransform:
    """Instantiate a transform from ``{"name": ..., **params}`` for images with ``channels`` channels."""
    p = validate_transform(spec)
    if isinstance(p, FeatureSqueezingParams):
        if p.bits == 1 and channels > 1:
            _warn_mnist_setting("feature_squeezing with bits=1 leaves a colour image 8 colours: 1 bit is Xu et al.'s "
                                "MNIST setting; their CIFAR-10 and ImageNet squeezers keep 5 (set bits: 5)")
        return FeatureSqueezing(p.bits, p.median)
    if isinstance(p, NoiseInjectionParams):
        return GaussianNoise(p.sigma)
    if p.pool > 1 and channels > 1:
        _warn_mnist_setting(f"autoencoder with pool={p.pool} blurs colour images through its pooled bottleneck, "
                            "MagNet's MNIST reformer; its CIFAR-10 reformer does not pool (set pool: 1)")
    return DenoisingAutoencoder(channels, p.width, p.noise, p.pool)


def auxiliary_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The input transform's own training loss when ``model`` is ``Defended`` by a trainable transform."""
    if isinstance(model, Defended):
        return model.transform.training_loss(x)
    return None
