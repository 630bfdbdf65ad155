"""What a run's configuration asks of the training loop (:mod:`robustlab.training`).

The optimiser and the learning-rate schedule, the checkpoint selection rule, whether the run trains
at its eps at all, and when validation accuracy at chance means training stalled.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustlab.config import RunConfig
from robustlab.defenses import Objective, build_objective


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: RunConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration lr schedule: constant, piecewise (milestones as fractions), cosine, or one-cycle."""
    t = config.train
    total = t.epochs * steps_per_epoch
    if t.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=total, pct_start=0.4)
    if t.schedule == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif t.schedule == "piecewise":
        bounds = [int(m * total) for m in t.milestones]
        factor = lambda step: t.gamma ** sum(step >= b for b in bounds)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


#: Epochs in a row at chance-level validation accuracy after which the Trainer says training stalled.
STALL_EPOCHS = 3


def stalled_at_chance(history: list[dict[str, Any]], num_classes: int, epochs: int = STALL_EPOCHS) -> bool:
    """Whether each of the last ``epochs`` epochs left clean validation accuracy below 1.5x chance.

    The signature of adversarial training that never left its first plateau (PGD-AT at MNIST eps 0.3
    from the first batch: loss 2.30, one class predicted): worth a warning while it runs, not after
    50 epochs.
    """
    recent = [row.get("val_clean_acc") for row in history[-epochs:]]
    return len(recent) == epochs and all(isinstance(a, int | float) and a < 1.5 / num_classes for a in recent)


def _selection_rule(objective: Objective, config: RunConfig) -> str:
    """``train.select``, unless the objective imposes its own rule (the hybrid's best-robust checkpoint).

    ``auto`` keeps the best validation robust accuracy for adversarial objectives (an adversarially
    trained model is kept for its robustness: its best clean epoch is often an early, weakly robust
    one) and the best validation clean accuracy for the others.
    """
    if objective.select:
        return objective.select
    if config.train.select == "auto":
        return "val_robust" if objective.adversarial else "val_clean"
    return config.train.select


def _measures_val_robust(objective: Objective, config: RunConfig) -> bool:
    return objective.needs_val_robust or _selection_rule(objective, config) == "val_robust"


def training_uses_eps(config: RunConfig) -> bool:
    """Whether ``threat.eps`` can change what training ``config`` produces (weights or history).

    False only when the objective ignores the budget (``Objective.uses_eps``) and no validation PGD
    runs (it attacks at ``threat.eps`` and may pick the checkpoint): then runs that differ only in
    eps are the same training, which an experiment grid runs once.
    """
    objective = build_objective(config.defense.name, config.defense.params)
    return objective.uses_eps or _measures_val_robust(objective, config)
