"""AutoAttack (Croce & Hein 2020): a parameter-free ensemble, each attack run only on still-robust points.

- ``standard``: APGD-CE (100 steps) -> APGD-T (100 steps, 9 target classes) -> FAB-T (100 steps,
  9 target classes) -> Square (5000 queries), the configuration of the paper and of RobustBench.
- ``rand`` (for randomised defences): APGD-CE -> APGD-DLR, each attacking an EOT model that averages
  ``eot_samples`` (20) random draws (:class:`~robustlab.attacks.wrappers.EOT`), every sample for all
  ``steps``: a point that has just crossed the boundary of the EOT average is still classified
  correctly by many single draws, so APGD does not stop there (on the CIFAR-10 noise-injection model
  stopping there left 13.7% robust where PGD-20 through the same EOT left 6.4%).

The result records the robust accuracy after every stage, so each number names the attack that
produced it (``{"clean": .., "apgd-ce": .., "apgd-t": .., "fab-t": .., "square": ..}``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from robustlab.attacks.apgd import apgd
from robustlab.attacks.core import Model, check_attack_inputs, float32_logits, frozen
from robustlab.attacks.fab import fab_t
from robustlab.attacks.square import square
from robustlab.attacks.wrappers import EOT, EOT_SAMPLES
from robustlab.errors import InputError

Stage = tuple[str, Callable[..., torch.Tensor], dict[str, Any]]
#: The full-strength budgets (the paper's and RobustBench's): fewer steps or queries make a weaker attack.
FULL_STEPS = 100
FULL_QUERIES = 5000


@dataclass
class AutoAttackResult:
    """Adversarial images and the robust accuracy (fraction in [0, 1]) after each stage, in order."""

    x_adv: torch.Tensor
    robust: torch.Tensor  # bool (N,): still correctly classified after every stage
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean())


def autoattack_stages(version: str, steps: int = FULL_STEPS, queries: int = FULL_QUERIES) -> list[Stage]:
    """The (name, attack, kwargs) sequence of an AutoAttack ``version``."""
    if version == "standard":
        return [
            ("apgd-ce", apgd, {"steps": steps, "loss": "ce"}),
            ("apgd-t", apgd, {"steps": steps, "targeted": True, "n_target_classes": 9}),
            ("fab-t", fab_t, {"steps": steps, "n_target_classes": 9}),
            ("square", square, {"queries": queries, "rescale_schedule": False}),  # as the reference builds it
        ]
    if version == "rand":
        return [
            ("apgd-ce", apgd, {"steps": steps, "loss": "ce", "early_stop": False}),
            ("apgd-dlr", apgd, {"steps": steps, "loss": "dlr", "early_stop": False}),
        ]
    raise InputError(f"unknown AutoAttack version '{version}'; valid: standard, rand")


def autoattack(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    steps: int = FULL_STEPS,
    queries: int = FULL_QUERIES,
    eot_samples: int = EOT_SAMPLES,
    generator: torch.Generator | None = None,
) -> AutoAttackResult:
    """Run AutoAttack ``version`` at budget ``eps``; see the module docstring."""
    check_attack_inputs(model, x, y, eps, norm)
    stages = autoattack_stages(version, steps, queries)
    attacked = attacked_model(model, version, eot_samples)
    x = x.detach()
    x_adv = x.clone()
    with frozen(model):
        robust = float32_logits(model, x).argmax(1) == y
    accuracy = {"clean": float(robust.float().mean())}
    for stage in stages:
        run_stage(stage, model, attacked, x, y, x_adv, robust, eps=eps, norm=norm, generator=generator,
                  keep_candidates=version == "rand")
        accuracy[stage[0]] = float(robust.float().mean())
    return AutoAttackResult(x_adv, robust, accuracy)


def attacked_model(model: Model, version: str, eot_samples: int = EOT_SAMPLES) -> Model:
    """The model the stages differentiate: an EOT average for the ``rand`` version, else ``model``.

    A model that already is an EOT average (an evaluation's adaptive model) is used as it is: averaging
    it again would multiply the draws per step (20 x 20), not improve the gradient estimate's purpose.
    """
    if version != "rand" or isinstance(model, EOT):
        return model
    return EOT(model, eot_samples)  # type: ignore[arg-type]


def run_stage(
    stage: Stage,
    model: Model,
    attacked: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    robust: torch.Tensor,
    *,
    eps: float,
    norm: str,
    generator: torch.Generator | None = None,
    keep_candidates: bool = False,
) -> None:
    """Run one stage on the still-robust points; update ``x_adv`` and ``robust`` in place where it succeeds.

    The stage differentiates ``attacked``; success is judged by ``model``'s prediction. With
    ``keep_candidates`` (the ``rand`` version) a point the stage did not break keeps the stage's candidate
    as its adversarial image, not the clean image: a random model that classified it correctly once may
    not on the next draw, and whoever classifies ``x_adv`` again must see the attack's best point.
    """
    _, attack, kwargs = stage
    todo = robust.nonzero().squeeze(1)
    if not todo.numel():
        return
    candidate = attack(attacked, x[todo], y[todo], eps=eps, norm=norm, generator=generator, validate=False, **kwargs)
    with frozen(model):
        logits = float32_logits(model, candidate)
        broken = logits.argmax(1) != y[todo]
        take = broken
        if keep_candidates:  # a survivor keeps this stage's point or an earlier one's, whichever has the higher loss
            earlier = F.cross_entropy(float32_logits(model, x_adv[todo]), y[todo], reduction="none")
            take = broken | (F.cross_entropy(logits, y[todo], reduction="none") > earlier)
    x_adv[todo[take]] = candidate[take]
    robust[todo[broken]] = False


def autoattack_x(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf", **kwargs: Any
) -> torch.Tensor:
    """Registry form of :func:`autoattack`: just the adversarial images."""
    return autoattack(model, x, y, eps=eps, norm=norm, **kwargs).x_adv
