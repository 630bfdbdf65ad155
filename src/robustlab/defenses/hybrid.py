"""The paper's hybrid defence (§3): dynamic adversarial augmentation + an adaptive clean/adversarial loss.

Our reading (docs/defences.md, "The hybrid defence, made precise"), every free choice a parameter:

1. Dynamic augmentation (§3.1): the training budget ``eps_t`` ramps from ``eps * start_fraction`` to the
   run's ``eps`` over ``ramp_epochs`` (default 40% of the epochs) following ``schedule``, recomputed
   every iteration (:func:`eps_schedule`), then stays at ``eps``.
2. Each batch is attacked at ``eps_t`` with FGSM from a random start (step ``fgsm_step * eps_t``) or
   PGD-k (step ``pgd_step * eps_t / k``), through the shared crafting helper.
3. Adaptive loss (§3.2): ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(x_adv), y)`` on the union of the
   clean and adversarial batch.
4. ``alpha = acc_adv / (acc_adv + acc_clean)`` from the loop's *validation* clean accuracy and PGD
   accuracy at the **target** eps after every epoch (:func:`adaptive_alpha`; ``alpha_init`` for the
   first epoch, 0.5 when both are 0, optional EMA and clamp).
5. Refinement (§3.3 step 4): the run keeps the checkpoint with the best validation PGD accuracy
   (``select``), and a catastrophic-overfitting guard (Wong et al. 2020 §5) switches the FGSM
   augmentation to PGD-2 for the remaining epochs when the validation PGD accuracy collapses (below
   ``co_drop`` x its best, a best of at least ``co_min_best``: early in a ramp to a large eps the
   accuracy at the target eps sits near 0, where 1% -> 0% is noise, not a collapse) while the
   training FGSM accuracy stays high (>= ``co_train_acc``), or, after an epoch trained entirely at
   eps (its mean ``train_eps_t`` is eps), when the training FGSM accuracy exceeds the validation PGD accuracy by
   ``co_gap`` or more (PGD never rose: single-step training that only learned to mask FGSM). The event
   goes to the history's ``events`` column.

History columns: ``alpha`` (used in the epoch), ``eps_t`` (at the end of the epoch), ``train_eps_t``
(mean over the epoch), ``alpha_next``, ``attack``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from robustlab.defenses.adversarial import AdversarialObjective, AttackPlan, CraftParams, Forward
from robustlab.defenses.base import LossAndStats, TrainState, batch_accuracy
from robustlab.defenses.schedule import Schedule, eps_schedule


def adaptive_alpha(
    acc_clean: float, acc_adv: float, previous: float | None = None, ema: float = 0.0, alpha_min: float = 0.0,
    alpha_max: float = 1.0,
) -> float:
    """The paper's loss weight ``alpha = Acc_adv / (Acc_adv + Acc_clean)`` (§3.2), 0.5 when undefined.

    With ``ema > 0`` and a ``previous`` alpha: ``ema * previous + (1 - ema) * alpha``; then clamped to
    ``[alpha_min, alpha_max]``.
    """
    total = acc_adv + acc_clean
    alpha = 0.5 if total <= 0 else acc_adv / total
    if previous is not None and ema > 0:
        alpha = ema * previous + (1.0 - ema) * alpha
    return min(alpha_max, max(alpha_min, alpha))


class HybridParams(CraftParams):
    start_fraction: float = Field(default=0.1, ge=0.0, le=1.0, description="eps_t starts at eps * start_fraction")
    ramp_epochs: float | None = Field(default=None, ge=0.0, le=10_000, description="default: 40% of the epochs")
    schedule: Schedule = "linear"
    plateaus: int = Field(default=4, ge=1, le=1000, description="levels of the step schedule")
    attack: Literal["fgsm", "pgd"] = "fgsm"
    attack_steps: int = Field(default=2, ge=1, le=1000, description="k of the pgd augmentation attack")
    fgsm_step: float = Field(default=1.25, gt=0.0, le=4.0, description="FGSM-RS step as a multiple of eps_t")
    pgd_step: float = Field(default=2.5, gt=0.0, le=10.0, description="PGD step = pgd_step * eps_t / k")
    alpha_init: float = Field(default=0.5, ge=0.0, le=1.0, description="alpha of the first epoch")
    alpha_ema: float = Field(default=0.0, ge=0.0, lt=1.0, description="EMA factor on alpha (0: none)")
    alpha_min: float = Field(default=0.0, ge=0.0, le=1.0)
    alpha_max: float = Field(default=1.0, ge=0.0, le=1.0)
    select: Literal["val_robust", "config"] = Field(
        default="val_robust", description="keep the best validation-PGD checkpoint, or follow train.select"
    )
    co_guard: bool = Field(default=True, description="catastrophic-overfitting guard (switch FGSM -> PGD-2)")
    co_drop: float = Field(default=0.5, gt=0.0, lt=1.0, description="collapse: val PGD acc < co_drop * best")
    co_min_best: float = Field(
        default=0.1, ge=0.0, le=1.0, description="...of a best val PGD acc >= this (lower is noise at the floor)"
    )
    co_train_acc: float = Field(default=0.5, ge=0.0, le=1.0, description="...while train FGSM acc >= this")
    co_gap: float = Field(default=0.3, gt=0.0, le=1.0, description="or train FGSM acc - val PGD acc >= this")

    @model_validator(mode="after")
    def _consistent(self) -> HybridParams:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max})")
        if self.schedule == "exponential" and self.start_fraction == 0:
            raise ValueError("the exponential schedule needs start_fraction > 0")
        return self


class HybridObjective(AdversarialObjective):
    """Dynamic adversarial augmentation + adaptive loss (the paper's method, §3); see the module docstring."""

    name = "hybrid"
    Params = HybridParams
    needs_val_robust = True

    def __init__(self, params: HybridParams | None = None) -> None:
        super().__init__(params)
        self.alpha = self.params.alpha_init
        self.attack = self.params.attack
        self.attack_steps = self.params.attack_steps
        self.best_val_robust = 0.0

    @property
    def select(self) -> str | None:
        return "val_robust" if self.params.select == "val_robust" else None

    def eps_t(self, state: TrainState) -> float:
        p = self.params
        ramp_epochs = 0.4 * state.epochs if p.ramp_epochs is None else p.ramp_epochs
        return eps_schedule(state.step, ramp_epochs * state.steps_per_epoch, state.eps, p.start_fraction,
                            p.schedule, p.plateaus)

    def attack_plan(self, state: TrainState) -> AttackPlan:
        eps_t = self.eps_t(state)
        if self.attack == "fgsm":
            return AttackPlan("fgsm", eps_t, 1, self.params.fgsm_step * eps_t)
        return AttackPlan("pgd", eps_t, self.attack_steps, self.params.pgd_step * eps_t / self.attack_steps)

    def adversarial_loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, state: TrainState
    ) -> LossAndStats:
        logits = forward(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        loss = self.alpha * F.cross_entropy(clean, y) + (1.0 - self.alpha) * F.cross_entropy(adv, y)
        return loss, {"loss": loss.detach(), "acc": batch_accuracy(clean, y), "adv_acc": batch_accuracy(adv, y),
                      "eps_t": self.eps_t(state)}

    def on_epoch_start(self, state: TrainState) -> dict[str, float]:
        return {"alpha": self.alpha}

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> dict[str, Any]:
        p = self.params
        # clean and PGD accuracy of the same validation images (the PGD subset, train.val_robust_size)
        clean, robust = metrics["val_robust_clean_acc"], metrics["val_robust_acc"]
        train_adv_acc = metrics["train_adv_acc"]  # the epoch's mean, over every rank's batches
        best = self.best_val_robust
        collapsed = best >= p.co_min_best and robust < p.co_drop * best and train_adv_acc >= p.co_train_acc
        # FGSM accuracy at a smaller budget than PGD's says nothing of masking: only an epoch wholly at eps counts
        whole_epoch_at_eps = metrics["train_eps_t"] >= state.eps * (1 - 1e-6)
        masked = whole_epoch_at_eps and train_adv_acc - robust >= p.co_gap
        if p.co_guard and self.attack == "fgsm" and (collapsed or masked):
            self.attack, self.attack_steps = "pgd", 2
            state.log.append(
                f"catastrophic overfitting: val PGD acc {robust:.3f} (best {self.best_val_robust:.3f}) while train "
                f"FGSM acc {train_adv_acc:.3f}; augmentation switched to pgd-2"
            )
        self.best_val_robust = max(self.best_val_robust, robust)
        self.alpha = adaptive_alpha(clean, robust, self.alpha, p.alpha_ema, p.alpha_min, p.alpha_max)
        attack = "fgsm" if self.attack == "fgsm" else f"pgd-{self.attack_steps}"
        return {"eps_t": self.eps_t(state), "alpha_next": self.alpha, "attack": attack}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "attack": self.attack, "attack_steps": self.attack_steps,
                "best_val_robust": self.best_val_robust}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self.attack = state["attack"]
        self.attack_steps = int(state["attack_steps"])
        self.best_val_robust = float(state["best_val_robust"])
