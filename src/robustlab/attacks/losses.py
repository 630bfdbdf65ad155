"""Per-sample attack objectives, all written to be *maximised* by an untargeted attacker.

- ``ce``: cross-entropy (Goodfellow et al. 2015; Madry et al. 2018).
- ``cw``: the Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (Carlini & Wagner 2017, f_6), capped at
  ``kappa`` above zero as in the original attack.
- ``dlr``: the difference-of-logits ratio (Croce & Hein 2020, Eq. 6), scale invariant.

Targeted variants return the negated objective towards the target class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustlab.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.max(dim=1).values


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = float("inf")) -> torch.Tensor:
    """``max_{j != y} z_j - z_y``: positive exactly when the sample is misclassified."""
    margin = _other_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)
    return margin.clamp(max=kappa) if kappa != float("inf") else margin


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with logits sorted descending (untargeted DLR)."""
    top = logits.sort(dim=1, descending=True).values
    denominator = top[:, 0] - top[:, 2] + 1e-12
    return cw_margin(logits, y) / denominator


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, Eq. 7), to be maximised: ``(z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4)/2)``."""
    top = logits.sort(dim=1, descending=True).values
    denominator = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return (z_t - z_y) / denominator


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_margin, "dlr": dlr_loss}


def objective(name: str, targeted: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample function of (logits, label-or-target) that the attacker ascends."""
    if name not in LOSSES:
        raise InputError(f"unknown attack loss '{name}'; valid: {', '.join(LOSSES)}")
    base = LOSSES[name]
    if not targeted:
        return base
    if name == "ce":
        return lambda logits, t: -ce_loss(logits, t)
    # margin-type losses towards a target: maximise z_t - max_{j != t} z_j
    return lambda logits, t: -base(logits, t)
