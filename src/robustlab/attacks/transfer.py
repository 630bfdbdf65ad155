"""Transfer (black-box) attacks: craft on a surrogate model, evaluate on the target (Papernot et al. 2017).

A defence that only masks its own gradients still falls to examples crafted on an undefended
surrogate; a large gap between white-box and transfer accuracy is a gradient-masking symptom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from robustlab.attacks.core import Model, check_attack_inputs, frozen
from robustlab.attacks.registry import make_attack


@dataclass
class TransferResult:
    """Examples crafted on the surrogate, and accuracy (in [0, 1]) of both models on them."""

    x_adv: torch.Tensor
    attack: str
    surrogate_accuracy: float
    target_accuracy: float


def _accuracy(model: Model, x: torch.Tensor, y: torch.Tensor) -> float:
    with frozen(model), torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def transfer_attack(
    surrogate: Model,
    target: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str | dict[str, Any] = "pgd-20",
    eps: float,
    norm: str = "linf",
    **kwargs: Any,
) -> TransferResult:
    """Run the registered ``attack`` (e.g. ``"pgd-20"``) on ``surrogate``; score on ``target``."""
    check_attack_inputs(target, x, y, eps, norm)
    craft = make_attack(attack, eps=eps, norm=norm, **kwargs)
    x_adv = craft(surrogate, x, y)
    return TransferResult(x_adv, craft.__name__, _accuracy(surrogate, x_adv, y), _accuracy(target, x_adv, y))
