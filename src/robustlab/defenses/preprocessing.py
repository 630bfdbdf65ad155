"""Input-transform defences as model wrappers (paper §2.2, "Input Preprocessing").

``Defended(model, transform)`` classifies ``model(transform(x))``. Each transform declares whether it
is ``differentiable`` (else attacks must use BPDA, Athalye et al. 2018) and whether it is ``random``
(else attacks must use EOT), so evaluation picks the adaptive attack automatically rather than
reporting the false robustness of obfuscated gradients.
"""

from __future__ import annotations

import torch
from torch import nn


class InputTransform(nn.Module):
    """Base for preprocessing transforms: maps [0, 1] images to [0, 1] images of the same shape."""

    differentiable: bool = True
    random: bool = False


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
