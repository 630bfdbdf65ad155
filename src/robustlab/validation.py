"""Checks for tensors crossing the public API.

The library's contract (docs/data-and-models.md): images are float NCHW in [0, 1], labels are int64
in ``[0, num_classes)``, and perturbation budgets are finite and non-negative. These checks turn a
violation into an :class:`~robustlab.errors.InputError` naming what is wrong, so an attack is never
silently run on, say, [0, 255] images (where eps=0.3 would be meaningless).
"""

from __future__ import annotations

import math

import torch

from robustlab.errors import InputError

_PIXEL_TOLERANCE = 1e-5


def check_images(x: torch.Tensor, name: str = "images") -> None:
    """Raise InputError unless ``x`` is a finite float NCHW tensor with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(
            f"{name} must be a float tensor in [0, 1], got dtype {x.dtype} "
            "(convert uint8 images with x.float() / 255)"
        )
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] > 3 and x.shape[2] > 3:  # (N, H, W, C): an image's rows first
        raise InputError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}, which looks like "
                         "(N, H, W, C): use x.permute(0, 3, 1, 2)")
    if x.numel() == 0:
        raise InputError(f"{name} is empty")
    # one pass: NaN propagates through min/max and an infinity shows up as an extreme
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{name} contain NaN or infinite values")
    if lo < -_PIXEL_TOLERANCE or hi > 1 + _PIXEL_TOLERANCE:
        hint = " (they look like [0, 255] pixels: divide by 255)" if hi > 1.5 else ""
        raise InputError(f"{name} must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]{hint}")


def check_labels(y: torch.Tensor, batch_size: int, num_classes: int | None = None) -> None:
    """Raise InputError unless ``y`` is an integer vector of length ``batch_size`` of valid classes."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != batch_size:
        raise InputError(f"labels must have shape ({batch_size},), got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise InputError(f"labels must be < num_classes={num_classes}, found {int(y.max())}")


def check_eps(eps: float, norm: str = "linf", name: str = "eps") -> float:
    """Return ``eps`` as a float after checking it is a finite, non-negative, sensible budget.

    An Linf budget above 1 is absurd for [0, 1] pixels (every image is reachable), so it is refused;
    L2 budgets are only required to be finite and non-negative.
    """
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {eps!r}")
    if norm == "linf" and value > 1:
        hint = f" (for {value:g}/255 write {value:g}/255)" if value <= 255 else ""
        raise InputError(f"{name}={value:g} is larger than the [0, 1] pixel range; Linf budgets must be <= 1{hint}")
    return value


def check_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> None:
    """Check an (images, labels) pair together."""
    check_images(x)
    check_labels(y, x.shape[0], num_classes)
