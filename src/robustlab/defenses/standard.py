"""Standard (empirical risk minimisation) training: cross-entropy on clean images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.defenses.base import LossAndStats, Objective, TrainState, batch_accuracy


class StandardObjective(Objective):
    """``CE(f(x), y)``: the undefended baseline every defence is compared with."""

    name = "standard"
    uses_eps = False

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: TrainState) -> LossAndStats:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": batch_accuracy(logits, y)}
