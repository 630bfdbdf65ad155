"""The Carlini-Wagner L2 attack (Carlini & Wagner 2017, "Towards Evaluating the Robustness of NNs", §V).

A minimum-distortion attack: for each image it solves

    minimise  ||x' - x||_2^2 + c * f(x'),    f(x') = max(z_y(x') - max_{j != y} z_j(x'), -kappa)

(the paper's objective f_6, untargeted; targeted: ``max(max_{j != t} z_j - z_t, -kappa)``) by Adam in the
change of variables ``x' = (tanh(w) + 1) / 2`` that keeps pixels in [0, 1] without clipping, with a
per-sample binary search over the trade-off constant ``c``: a success lowers ``c`` towards the smallest
distortion, a failure raises it (x10 until a first success, then bisection). Each binary-search step
aborts early when the objective has stopped improving (the paper's "abort early").

Adam is written out here (same update as ``torch.optim.Adam``) so finished samples can leave the batch
without disturbing the optimiser state of the others.

The attack returns the smallest-L2 successful example found per sample, its L2 distance and a success
flag (:class:`CWResult`); the registered ``cw_l2`` attack keeps a result only inside the requested
eps-ball, so it obeys the library's budget contract like every other attack.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from robustlab.attacks.core import (
    Model,
    check_attack_inputs,
    clip_to_ball,
    float32_confirmed,
    frozen,
    lp_norm,
    per_sample,
)
from robustlab.attacks.losses import cw_margin
from robustlab.errors import InputError

_TANH_SHRINK = 1 - 1e-6  # keeps atanh finite at pixels exactly 0 or 1


@dataclass
class CWResult:
    """Output of :func:`carlini_wagner_l2`: adversarial images (x itself where the attack failed)."""

    x_adv: torch.Tensor
    success: torch.Tensor  # bool (N,): an adversarial example was found
    l2: torch.Tensor  # float (N,): ||x_adv - x||_2 (0 where it failed)

    def median_l2(self) -> float:
        """Median L2 distortion over the successful samples (nan if none succeeded)."""
        return float(self.l2[self.success].median()) if bool(self.success.any()) else float("nan")


def _to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh((2 * x - 1) * _TANH_SHRINK)


def _from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2


def _succeeds(logits: torch.Tensor, labels: torch.Tensor, kappa: float, targeted: bool) -> torch.Tensor:
    """Success with confidence ``kappa``: the margin towards the target (away from y) exceeds kappa.

    With ``kappa = 0`` this is plain (mis)classification, so ties in the logits count as in argmax.
    """
    if kappa == 0:
        prediction = logits.argmax(1)
        return prediction == labels if targeted else prediction != labels
    margin = cw_margin(logits, labels)
    return (-margin if targeted else margin) > kappa


def carlini_wagner_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
    binary_search_steps: int = 5,
    abort_early: bool = True,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    validate: bool = True,
) -> CWResult:
    """Run CW-L2 on a batch; see the module docstring for the objective and schedule.

    Args:
        c: initial trade-off constant (per sample, then adapted by the binary search).
        kappa: confidence margin (0 = just cross the decision boundary).
        steps: Adam iterations per binary-search step.
        binary_search_steps: 1 reproduces a fixed-``c`` attack (torchattacks' ``CW``).
        abort_early: end a binary-search step when the objective has not improved by 0.01% over
            ``steps // 10`` iterations (the paper's implementation, applied per sample).
    """
    if validate:
        check_attack_inputs(model, x, y, 0.0, "l2")
    if c <= 0 or kappa < 0 or steps < 0 or binary_search_steps < 1 or lr <= 0:
        raise InputError("cw_l2 needs c > 0, kappa >= 0, steps >= 0, binary_search_steps >= 1 and lr > 0")
    if targeted and target is None:
        raise InputError("a targeted attack needs target labels")
    labels = target if targeted else y
    x = x.detach()
    n = x.shape[0]
    best_l2 = torch.full((n,), float("inf"), device=x.device)
    best_adv = x.clone()
    const = torch.full((n,), float(c), device=x.device)
    lower = torch.zeros(n, device=x.device)
    upper = torch.full((n,), float("inf"), device=x.device)
    w_start = _to_tanh_space(x)
    with frozen(model):
        for _ in range(binary_search_steps):
            found = _optimise(
                model, x, w_start, labels, const, kappa, steps, lr, abort_early, targeted, best_l2, best_adv
            )
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            bisect = (lower + upper) / 2
            const = torch.where(upper < float("inf"), bisect, const * 10)
    success = best_l2 < float("inf")
    l2 = torch.where(success, best_l2, torch.zeros_like(best_l2))
    return CWResult(best_adv, success, l2)


def _optimise(
    model: Model,
    x: torch.Tensor,
    w_start: torch.Tensor,
    labels: torch.Tensor,
    const: torch.Tensor,
    kappa: float,
    steps: int,
    lr: float,
    abort_early: bool,
    targeted: bool,
    best_l2: torch.Tensor,
    best_adv: torch.Tensor,
) -> torch.Tensor:
    """One binary-search step (Adam on w for every sample); updates best_l2/best_adv in place.

    Returns which samples succeeded at their current constant.
    """
    betas, adam_eps = (0.9, 0.999), 1e-8
    w = w_start.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    active = torch.arange(x.shape[0], device=x.device)
    previous = torch.full((x.shape[0],), float("inf"), device=x.device)
    check_every = max(1, steps // 10)
    sign = -1.0 if targeted else 1.0
    judge = functools.partial(_succeeds, kappa=kappa, targeted=targeted)
    for step in range(1, steps + 1):
        w_a = w[active].requires_grad_(True)
        with torch.enable_grad():
            x_adv = _from_tanh_space(w_a)
            logits = model(x_adv)
            dist = (x_adv - x[active]).flatten(1).pow(2).sum(1)
            attack_term = (-sign * cw_margin(logits, labels[active])).clamp(min=-kappa)
            objective = dist + const[active] * attack_term
            (grad,) = torch.autograd.grad(objective.sum(), w_a)
        with torch.no_grad():
            hit = float32_confirmed(model, x_adv, judge(logits, labels[active]), judge, labels[active])
            l2 = dist.sqrt()
            better = hit & (l2 < best_l2[active])
            best_l2[active] = torch.where(better, l2, best_l2[active])
            best_adv[active] = torch.where(per_sample(better, x_adv), x_adv.detach(), best_adv[active])
            found[active] = found[active] | hit
            m[active] = betas[0] * m[active] + (1 - betas[0]) * grad
            v[active] = betas[1] * v[active] + (1 - betas[1]) * grad * grad
            m_hat = m[active] / (1 - betas[0] ** step)
            v_hat = v[active] / (1 - betas[1] ** step)
            w[active] = w_a.detach() - lr * m_hat / (v_hat.sqrt() + adam_eps)
            if abort_early and step % check_every == 0:
                stalled = objective.detach() > previous[active] * 0.9999
                previous[active] = objective.detach()
                keep = ~stalled
                active = active[keep]
                if active.numel() == 0:
                    break
    return found


def cw_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "l2",
    steps: int = 100,
    c: float = 1.0,
    kappa: float = 0.0,
    lr: float = 0.01,
    binary_search_steps: int = 5,
    abort_early: bool = True,
    targeted: bool = False,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Registry form of CW-L2: returns x_adv, keeping a found example only if it lies in the eps-ball.

    CW-L2 minimises distortion and has no budget of its own; a sample whose smallest adversarial
    example is farther than ``eps`` (in ``norm``) is returned unperturbed, i.e. counted as robust at eps.
    """
    check_attack_inputs(model, x, y, eps, norm)
    result = carlini_wagner_l2(
        model,
        x,
        y,
        c=c,
        kappa=kappa,
        steps=steps,
        lr=lr,
        binary_search_steps=binary_search_steps,
        abort_early=abort_early,
        targeted=targeted,
        target=target,
        validate=False,
    )
    inside = lp_norm(result.x_adv - x, norm) <= eps * (1 + 1e-6)
    x_adv = torch.where(per_sample(inside, x), result.x_adv, x.detach())
    return clip_to_ball(x_adv, x, eps, norm)
