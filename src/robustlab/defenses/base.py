"""What every training defence is: an objective ``(model, x, y, state) -> (loss, stats)``.

The training loop (``robustlab.training``) knows nothing about any particular defence. It calls the
objective on each batch, and its optional hooks at epoch boundaries, where the objective may read the
validation metrics the loop measured (the hybrid defence's alpha comes from there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from torch import nn

from robustlab.defenses.preprocessing import InputTransform, build_transform, validate_transform

#: What an objective's loss returns: the scalar to minimise and the batch's stats for the history.
#: Stats are detached 0-d tensors on the batch's device (or plain floats such as a schedule's value):
#: the training loop sums them on the device and reads them on the host only every few steps, so a
#: step never waits for the GPU to finish (``robustlab.training.STATS_EVERY``).
LossAndStats = tuple[torch.Tensor, dict[str, torch.Tensor | float]]


def batch_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of a batch of logits, for training statistics: a 0-d tensor, not read on the host."""
    return (logits.detach().argmax(1) == y).float().mean()


class ObjectiveParams(BaseModel):
    """Base for an objective's parameters: unknown names are errors.

    ``preprocess`` (any objective): an input transform ``{"name": ..., **params}`` placed in front of
    the classifier for training and evaluation, e.g. ``{"name": "noise_injection", "sigma": 0.3}`` on a
    ``pgd_at`` run (see ``robustlab.defenses.preprocessing``).
    """

    model_config = ConfigDict(extra="forbid")
    preprocess: dict[str, Any] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        from robustlab.config import refuse_boolean

        return refuse_boolean(cls, info.field_name, value)

    @field_validator("preprocess")
    @classmethod
    def _known_transform(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        if spec is not None:
            validate_transform(spec)
        return spec


@dataclass
class TrainState:
    """Where training is: read by objectives for schedules (e.g. the hybrid's eps ramp)."""

    epoch: int = 0  # 0-based
    epochs: int = 1
    step: int = 0  # global iteration count
    steps_per_epoch: int = 1
    eps: float = 0.0  # the run's target budget (config threat.eps)
    norm: str = "linf"
    generator: torch.Generator | None = None
    log: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))


class Objective:
    """A training defence. Subclasses set ``name``, ``Params`` and implement ``loss``.

    ``needs_val_robust``: ask the loop to measure validation PGD accuracy every epoch.
    ``uses_eps``: whether the loss reads the threat budget (``TrainState.eps``); an objective that does
    not is trained once for all the eps values of an experiment grid.
    ``select``: a checkpoint rule the objective imposes (``"val_robust"``) instead of ``train.select``.
    ``adversarial``: trains on adversarial examples, so ``train.select: auto`` keeps the checkpoint with
    the best validation *robust* accuracy (the best clean epoch is often an early, non-robust one).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    needs_val_robust: ClassVar[bool] = False
    uses_eps: ClassVar[bool] = True
    adversarial: ClassVar[bool] = False

    def __init__(self, params: ObjectiveParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @property
    def select(self) -> str | None:
        return None

    @property
    def full_budget_epoch(self) -> float:
        """The first epoch (0-based) trained entirely at the run's eps; earlier ones are never selected."""
        return 0.0

    def input_transform(self, channels: int) -> InputTransform | None:
        """The preprocessing transform the model is wrapped in (``Defended``), or None."""
        spec = self.params.preprocess
        return None if spec is None else build_transform(spec, channels)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: TrainState
    ) -> LossAndStats:
        raise NotImplementedError

    def on_epoch_start(self, state: TrainState) -> dict[str, float]:
        """Called before each epoch; returns values to log in that epoch's history row."""
        return {}

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> dict[str, float]:
        """Called after validation with the epoch's metrics, returns values to log in its history row.

        ``metrics`` holds ``val_clean_acc`` (and ``val_robust_acc`` when requested) and the epoch's mean
        of every training stat the loss returned, as ``train_<stat>``: averaged over all batches of every
        rank in data-parallel training, so a decision drawn from it is the same on one process or many.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed to resume (e.g. the current alpha)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
