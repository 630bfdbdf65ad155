"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...", Algorithm 1).

APGD is PGD without a step-size parameter. Starting from step ``eta = 2 * eps`` it

- takes a gradient step to ``z`` and moves with momentum:
  ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``
  with ``a = 0.75`` (``a = 1`` for the first step);
- at checkpoints ``w_j = ceil(p_j * N)``,
  ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``,
  halves the step of every sample for which (1) the loss increased in fewer than ``rho`` of the
  iterations since the last checkpoint, or (2) the step was not halved at the last checkpoint and the
  best loss has not improved since, and restarts that sample from its best point so far.

Losses: ``ce`` (APGD-CE), ``dlr`` (untargeted DLR, Eq. 6) and, with ``targeted=True``, the targeted DLR
loss (Eq. 7) towards each of the ``n_target_classes`` classes with the highest clean logits (APGD-T).

Per-sample early stopping: a sample leaves the batch as soon as it is misclassified. Every sample's
trajectory (its step size, checkpoints and momentum) depends only on itself, so this returns exactly
the same verdicts as running the whole batch for all iterations, at a fraction of the cost.
All randomness comes from ``generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from robustlab.attacks.core import (
    Model,
    ascent_direction,
    check_attack_inputs,
    clip_to_ball,
    float32_confirmed,
    float32_logits,
    frozen,
    input_gradient,
    misclassified,
    per_sample,
    random_init,
)
from robustlab.attacks.losses import dlr_targeted_loss, objective
from robustlab.errors import InputError

LabelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def checkpoints(steps: int) -> list[int]:
    """Iterations ``w_j = ceil(p_j * steps)`` where APGD may halve its step (Croce & Hein 2020 §3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = (math.ceil(round(q * steps, 9)) for q in p[1:])  # round: 0.41 * 100 must give 41, not 42
    return sorted({m for m in marks if m <= steps})


def _targeted_dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Targeted DLR with ``labels[:, 0] = y`` and ``labels[:, 1] = target`` packed together."""
    return dlr_targeted_loss(logits, labels[:, 0], labels[:, 1])


def apgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    targeted: bool = False,
    n_target_classes: int = 9,
    rho: float = 0.75,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """APGD-CE / APGD-DLR (``targeted=False``) or APGD-T (``targeted=True``, targeted DLR loss).

    Restarts (and, for APGD-T, target classes) are run only on samples still correctly classified.
    For samples never fooled, the point of highest loss of the last run (restart or target class) is
    returned: the losses of different target classes do not compare, and accuracy does not depend on
    which unsuccessful point is kept.

    Returns:
        x_adv with ``||x_adv - x||_norm <= eps`` and values in [0, 1].
    """
    if validate:
        check_attack_inputs(model, x, y, eps, norm)
    if steps < 1 or restarts < 1 or not 0 < rho <= 1:
        raise InputError("apgd needs steps >= 1, restarts >= 1 and 0 < rho <= 1")
    x = x.detach()
    out = x.clone()
    if eps == 0:
        return out
    with frozen(model):
        clean_logits = float32_logits(model, x)
        fooled = misclassified(clean_logits, y)
        if targeted:
            order = clean_logits.sort(dim=1, descending=True).indices
            runs = [
                (order[:, k], _targeted_dlr) for k in range(1, min(n_target_classes, order.shape[1] - 1) + 1)
            ]
        else:
            runs = [(None, objective(loss, targeted=False))]
        for target, loss_fn in runs:
            for _ in range(restarts):
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return out
                labels = y[todo] if target is None else torch.stack([y[todo], target[todo]], dim=1)
                x_adv, hit = _apgd_run(
                    model, x[todo], y[todo], labels, loss_fn, eps, norm, steps, rho, early_stop, generator
                )
                out[todo] = x_adv
                fooled[todo] = hit
    return out


def _apgd_run(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LabelLoss,
    eps: float,
    norm: str,
    steps: int,
    rho: float,
    early_stop: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from a random start; returns (x_adv, misclassified)."""
    n = x.shape[0]
    result = x.clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    idx = torch.arange(n, device=x.device)  # original positions of the samples still in the batch

    x_adv = clip_to_ball(x + random_init(x, eps, norm, generator), x, eps, norm)
    grad, loss, logits = input_gradient(model, x_adv, labels, loss_fn)
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    x_prev = x_adv.clone()
    step = torch.full((n,), 2.0 * eps, device=x.device)
    increases = torch.zeros(n, device=x.device)
    loss_prev = loss.clone()
    best_at_checkpoint = loss_best.clone()
    halved_at_checkpoint = torch.zeros(n, dtype=torch.bool, device=x.device)
    marks = set(checkpoints(steps))
    last_mark = 0
    x_orig, y_orig, labels_all = x, y, labels

    def confirmed_hits(logits: torch.Tensor) -> torch.Tensor:
        y_now = y_orig[idx]
        return float32_confirmed(model, x_adv, misclassified(logits, y_now), misclassified, y_now)

    def record(hit: torch.Tensor) -> None:
        # writes through the index tensor idx, never a boolean mask: no host synchronisation
        result[idx] = torch.where(per_sample(hit, x_adv), x_adv, result[idx])
        fooled[idx] = fooled[idx] | hit

    hit = confirmed_hits(logits)
    record(hit)
    for k in range(1, steps + 1):
        if early_stop:  # the batch shrinks to the samples still robust (its size is read once per step)
            keep = ~hit
            idx = idx[keep]
            if idx.numel() == 0:
                break
            x_adv, x_prev, grad = x_adv[keep], x_prev[keep], grad[keep]
            x_best, loss_best, grad_best = x_best[keep], loss_best[keep], grad_best[keep]
            step, increases, loss_prev = step[keep], increases[keep], loss_prev[keep]
            best_at_checkpoint, halved_at_checkpoint = best_at_checkpoint[keep], halved_at_checkpoint[keep]
        x0 = x_orig[idx]
        z = clip_to_ball(x_adv + per_sample(step, x_adv) * ascent_direction(grad, norm), x0, eps, norm)
        a = 1.0 if k == 1 else 0.75
        x_next = clip_to_ball(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x0, eps, norm)
        x_prev, x_adv = x_adv, x_next
        grad, loss, logits = input_gradient(model, x_adv, labels_all[idx], loss_fn)
        hit = confirmed_hits(logits)
        record(hit)
        increases += (loss > loss_prev).float()
        loss_prev = loss
        better = loss > loss_best
        x_best = torch.where(per_sample(better, x_adv), x_adv, x_best)
        grad_best = torch.where(per_sample(better, grad), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        if k in marks:
            oscillating = increases <= rho * (k - last_mark)
            stuck = ~halved_at_checkpoint & (best_at_checkpoint >= loss_best)
            halve = oscillating | stuck
            step = torch.where(halve, step / 2, step)
            x_adv = torch.where(per_sample(halve, x_adv), x_best, x_adv)
            grad = torch.where(per_sample(halve, grad), grad_best, grad)
            halved_at_checkpoint, best_at_checkpoint = halve, loss_best.clone()
            increases.zero_()
            last_mark = k
    if idx.numel():
        result[idx] = torch.where(per_sample(fooled[idx], x_best), result[idx], x_best)
    return result, fooled
