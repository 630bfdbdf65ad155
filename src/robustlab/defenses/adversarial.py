"""Adversarial training objectives: PGD-AT, fast AT, TRADES, MART, and AWP as an option on each.

Every objective here crafts its adversarial batch through one helper, :func:`craft_adversarial`, which
calls the shared attack core (``robustlab.attacks.core.pgd`` / ``fgsm``, or the core's gradient,
ascent and projection helpers for the TRADES KL inner maximisation). The budget is the run's threat
model (``state.eps``, ``state.norm``).

Batch-norm mode while crafting (``attack_bn``): ``"eval"`` by default, i.e. the attack sees the same
network that is evaluated, normalised by the running statistics (as in the TRADES and MART reference
code); ``"train"`` attacks the train-mode network instead (Rice et al. 2020), normalised by each
batch's own statistics. In both modes crafting leaves the running statistics exactly as it found them
(the attack core restores every buffer, see :func:`robustlab.attacks.core.frozen`): they are updated
only by the loss's forward passes, once per batch, never by the k forward passes of the attack. The
mode and every ``requires_grad`` flag are restored after crafting too; the loss itself is always
computed in the mode the training loop set (train).

AWP (Wu et al. 2020, "Adversarial Weight Perturbation Helps Robust Generalization"): with
``awp_gamma > 0`` the weights are perturbed by one normalised ascent step on the objective's own
adversarial loss, ``v_l = gamma * ||w_l|| * g_l / ||g_l||`` for every weight matrix/kernel, and the loss
is evaluated at ``w + v``. Because ``v`` is detached, the gradient of that loss w.r.t. ``w`` is the
gradient at ``w + v``, which is exactly the update AWP applies after restoring ``w``; so no change to the
training loop is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from robustlab.attacks.core import (
    ascent_direction,
    buffers_kept,
    clip_to_ball,
    fgsm,
    frozen,
    input_gradient,
    pgd,
)
from robustlab.defenses.base import LossAndStats, Objective, ObjectiveParams, TrainState, batch_accuracy
from robustlab.defenses.preprocessing import Defended
from robustlab.defenses.schedule import eps_schedule
from robustlab.devices import to_device

Forward = Callable[[torch.Tensor], torch.Tensor]


class CraftParams(ObjectiveParams):
    """Parameters shared by every objective that trains on adversarial examples."""

    random_start: bool = Field(default=True, description="start the attack from a random point in the ball")
    attack_bn: Literal["eval", "train"] = Field(default="eval", description="network mode while crafting")
    awp_gamma: float = Field(default=0.0, ge=0.0, le=0.1, description="AWP weight-perturbation size (0: off)")
    awp_warmup: int = Field(default=0, ge=0, le=10_000, description="epochs of plain training before AWP starts")


class WarmupParams(CraftParams):
    """An objective that trains at the run's eps, optionally reached by a linear warm-up from 0."""

    eps_warmup: float = Field(default=0.0, ge=0.0, le=10_000, description="epochs of linear eps warm-up from 0")


class PGDParams(WarmupParams):
    """A k-step PGD inner maximisation (Madry et al. 2018)."""

    steps: int = Field(default=10, ge=1, le=1000, description="attack iterations per batch")
    step_size: float | None = Field(default=None, gt=0.0, le=1.0, description="pixels; default 2.5*eps/steps")


@dataclass(frozen=True)
class AttackPlan:
    """How to craft one training batch: ``method`` pgd | fgsm | kl, budget, steps and step size."""

    method: Literal["pgd", "fgsm", "kl"]
    eps: float
    steps: int
    step_size: float


def attack_view(model: nn.Module) -> Forward:
    """The function a training attack differentiates.

    A ``Defended`` model with a non-differentiable transform is attacked through BPDA with the
    identity (Athalye et al. 2018): forward through the transform, backward as if it were absent, so
    adversarial training behind feature squeezing still sees useful gradients.
    """
    if isinstance(model, Defended) and not model.differentiable:
        return lambda x: model.model(x + (model.transform(x) - x).detach())
    return model


def _kl_to_clean(logits: torch.Tensor, clean_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(p_clean || p_adv)``, the TRADES inner objective."""
    return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="none").sum(1)


def craft_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: AttackPlan,
    *,
    norm: str = "linf",
    random_start: bool = True,
    bn_mode: str = "eval",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The one place adversarial training batches are made (every objective calls it).

    ``pgd`` and ``fgsm`` (FGSM-RS when ``random_start``) maximise cross-entropy with the shared core;
    ``kl`` maximises ``KL(f(x) || f(x_adv))`` from ``x + 0.001 * N(0, 1)`` (TRADES, Zhang et al. 2019)
    with the core's gradient, ascent-direction and projection helpers. Model mode and flags are restored.
    """
    target = attack_view(model)
    with frozen(model):
        if bn_mode == "eval":
            model.eval()
        if plan.method == "pgd":
            return pgd(target, x, y, eps=plan.eps, steps=plan.steps, step_size=plan.step_size, norm=norm,
                       random_start=random_start, generator=generator, validate=False)
        if plan.method == "fgsm":
            return fgsm(target, x, y, eps=plan.eps, norm=norm, random_start=random_start, step_size=plan.step_size,
                        generator=generator, validate=False)
        with torch.no_grad():
            clean_probs = F.softmax(target(x), dim=1)
        noise = to_device(torch.randn(x.shape, generator=generator), x.device)
        x_adv = clip_to_ball(x + 0.001 * noise, x, plan.eps, norm)
        for _ in range(plan.steps):
            grad, _, _ = input_gradient(target, x_adv, clean_probs, _kl_to_clean)
            x_adv = clip_to_ball(x_adv + plan.step_size * ascent_direction(grad, norm), x, plan.eps, norm)
        return x_adv.detach()


def awp_forward(model: nn.Module, loss_of: Callable[[Forward], torch.Tensor], gamma: float) -> Forward:
    """A forward function at the AWP-perturbed weights ``w + v`` (Wu et al. 2020, one ascent step).

    ``loss_of(forward)`` is the objective's adversarial loss; its gradient w.r.t. each weight tensor of
    dimension > 1 (biases and norm scales are not perturbed, as in the reference implementation) gives
    ``v = gamma * ||w|| * g / ||g||``. Gradients of a loss computed with the returned function flow to
    ``w`` and equal the gradient at ``w + v``.
    """
    weights = {name: p for name, p in model.named_parameters() if p.dim() > 1 and p.requires_grad}
    with buffers_kept(model):  # the ascent step's forward must not update BatchNorm's running statistics
        grads = torch.autograd.grad(loss_of(model), list(weights.values()), allow_unused=True)
    perturbed: dict[str, torch.Tensor] = {}
    for (name, weight), grad in zip(weights.items(), grads, strict=True):
        if grad is None:
            continue
        step = gamma * weight.detach().norm() * grad / grad.norm().clamp_min(1e-12)
        perturbed[name] = weight + step.detach()
    return lambda inputs: functional_call(model, perturbed, (inputs,), strict=False)


class AdversarialObjective(Objective):
    """Base of every adversarial objective: craft with :meth:`attack_plan`, score with :meth:`adversarial_loss`.

    Subclasses only say how to attack and how to combine clean and adversarial logits; crafting, the
    BN mode and AWP are shared here.
    """

    Params = PGDParams
    adversarial = True

    @property
    def full_budget_epoch(self) -> float:
        """Epochs of the eps warm-up (``eps_warmup``) come first: they trained below the run's eps."""
        return float(getattr(self.params, "eps_warmup", 0.0))

    def eps_t(self, state: TrainState) -> float:
        """The budget of this iteration: the run's eps, after ``eps_warmup`` epochs of linear growth from 0."""
        warmup_steps = self.params.eps_warmup * state.steps_per_epoch
        return eps_schedule(state.step, warmup_steps, state.eps, start_fraction=0.0)

    def attack_plan(self, state: TrainState) -> AttackPlan:
        """PGD-k at :meth:`eps_t`, step ``step_size`` or ``2.5 * eps_t / steps``."""
        p = self.params
        eps = self.eps_t(state)
        step = p.step_size if p.step_size is not None else 2.5 * eps / p.steps
        return AttackPlan("pgd", eps, p.steps, step)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> dict[str, float]:
        """Log the budget reached when a warm-up is on (the hybrid logs its own ramp)."""
        return {"eps_t": self.eps_t(state)} if self.params.eps_warmup > 0 else {}

    def adversarial_loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, state: TrainState
    ) -> LossAndStats:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: TrainState) -> LossAndStats:
        p = self.params
        x_adv = craft_adversarial(
            model, x, y, self.attack_plan(state), norm=state.norm, random_start=p.random_start,
            bn_mode=p.attack_bn, generator=state.generator,
        )
        forward: Forward = model
        if p.awp_gamma > 0 and state.epoch >= p.awp_warmup:
            forward = awp_forward(model, lambda f: self.adversarial_loss(f, x, y, x_adv, state)[0], p.awp_gamma)
        return self.adversarial_loss(forward, x, y, x_adv, state)


class PGDATObjective(AdversarialObjective):
    """PGD adversarial training (Madry et al. 2018, Eq. 2.1): ``CE(f(x_adv), y)`` with PGD-k x_adv."""

    name = "pgd_at"

    def adversarial_loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, state: TrainState
    ) -> LossAndStats:
        logits = forward(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "adv_acc": batch_accuracy(logits, y)}


class FastATParams(WarmupParams):
    step_factor: float = Field(default=1.25, gt=0.0, le=4.0, description="FGSM step as a multiple of eps")


class FastATObjective(PGDATObjective):
    """Fast adversarial training (Wong et al. 2020): FGSM from a uniform random start, step 1.25*eps."""

    name = "fast_at"
    Params = FastATParams

    def attack_plan(self, state: TrainState) -> AttackPlan:
        eps = self.eps_t(state)
        return AttackPlan("fgsm", eps, 1, self.params.step_factor * eps)


class TradesParams(PGDParams):
    beta: float = Field(default=6.0, ge=0.0, le=100.0, description="weight of the KL robustness term")


class TradesObjective(AdversarialObjective):
    """TRADES (Zhang et al. 2019, Eq. 5): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``.

    ``x_adv`` maximises the same KL term (inner problem) with PGD-k from ``x + 0.001 * N(0, 1)``.
    """

    name = "trades"
    Params = TradesParams

    def attack_plan(self, state: TrainState) -> AttackPlan:
        return replace(super().attack_plan(state), method="kl")

    def adversarial_loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, state: TrainState
    ) -> LossAndStats:
        logits = forward(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        natural = F.cross_entropy(clean, y)
        robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        loss = natural + self.params.beta * robust
        return loss, {"loss": loss.detach(), "acc": batch_accuracy(clean, y), "adv_acc": batch_accuracy(adv, y),
                      "kl": robust.detach()}


class MartParams(PGDParams):
    beta: float = Field(default=6.0, ge=0.0, le=100.0, description="weight of the misclassification-aware KL term")


class MartObjective(AdversarialObjective):
    """MART (Wang et al. 2020, Eq. 9): boosted CE on x_adv + beta * KL(p(x)||p(x_adv)) * (1 - p_y(x)).

    BCE(p(x_adv), y) = -log p_y(x_adv) - log(1 - max_{k != y} p_k(x_adv)); the KL term is weighted per
    sample by how *misclassified* the clean input is, so hard examples are regularised more.
    """

    name = "mart"
    Params = MartParams

    def adversarial_loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, state: TrainState
    ) -> LossAndStats:
        logits = forward(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        adv_probs = F.softmax(adv, dim=1)
        wrong_best = adv_probs.scatter(1, y[:, None], 0.0).max(dim=1).values
        boosted_ce = F.cross_entropy(adv, y) - torch.log(1.0001 - wrong_best).mean()
        clean_probs = F.softmax(clean, dim=1)
        true_clean = clean_probs.gather(1, y[:, None]).squeeze(1)
        kl = (clean_probs * (torch.log(clean_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(1)
        robust = (kl * (1.0000001 - true_clean)).mean()
        loss = boosted_ce + self.params.beta * robust
        return loss, {"loss": loss.detach(), "acc": batch_accuracy(clean, y), "adv_acc": batch_accuracy(adv, y)}
