"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020b, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", Algorithm 1), Linf and L2.

FAB searches for the *smallest* perturbation that changes the decision. For a target class t, at the
current iterate x_i the decision boundary between the true class y and t is linearised,
``pi: <w, z> + b = 0`` with ``w = grad(f_t - f_y)(x_i)``, and both x_i and the original x are projected
onto ``pi`` intersected with the [0, 1] box (minimal ``norm`` step; :func:`project_to_hyperplane`). The
next iterate is a biased combination of the two (Eq. 9):

    x_{i+1} = clip( (1 - a) (x_i + eta d_i) + a (x + eta d_x) ),   a = min(|d_i| / (|d_i| + |d_x|), alpha_max)

with overshoot ``eta = 1.05`` and ``alpha_max = 0.1``. Whenever x_{i+1} is misclassified it is kept if it
is the closest so far, and the iterate backs off towards x: ``x_{i+1} = (1 - beta) x + beta x_{i+1}``.
FAB-T (Croce & Hein 2020, AutoAttack) runs this for each of the top-``n_target_classes`` other
classes; further restarts begin at a random point at half the best distance found (at most eps).

The box-constrained projection has a closed form up to a 1-D root: with the step
``d_i(t) = -sign(w_i) min(t a_i, u_i)`` towards the plane (``u_i`` the room to the box edge), the
plane is reached where the piecewise-linear, increasing ``g(t) = sum_i |w_i| min(t a_i, u_i)`` equals
``|<w, z> + b|``; ``a_i = 1`` for Linf and ``a_i = |w_i|`` for L2. Sorting the breakpoints gives the
root exactly for the whole batch at once.
"""

from __future__ import annotations

import torch

from robustlab.attacks.core import (
    Model,
    check_attack_inputs,
    clip_to_ball,
    float32_logits,
    frozen,
    lp_norm,
    per_sample,
)
from robustlab.devices import to_device
from robustlab.errors import InputError


def project_to_hyperplane(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Minimal-``norm`` step d (per sample) with ``<w, z + d> + b = 0`` and ``z + d`` in [0, 1].

    If the box makes the plane unreachable, the step goes as far towards it as the box allows.
    ``z``, ``w``: (N, D); ``b``: (N,). Returns d of shape (N, D).
    """
    value = (w * z).sum(1) + b
    toward = -torch.sign(value)[:, None] * torch.sign(w)  # direction each coordinate must move
    room = torch.where(toward > 0, 1 - z, z).clamp_min(0)
    slope = w.abs() if norm == "l2" else torch.ones_like(w)
    weight = w.abs() * slope  # d g / d t while coordinate i is not saturated
    safe_slope = slope.clamp_min(1e-12)
    breaks = torch.where(
        w.abs() > 0, room / safe_slope, torch.zeros_like(room)
    )  # t where coordinate i saturates
    order = breaks.argsort(dim=1)
    t_sorted = breaks.gather(1, order)
    weight_sorted = weight.gather(1, order)
    gain_sorted = (w.abs() * room).gather(1, order)
    # g at the k-th breakpoint: saturated coordinates contribute |w| u, the rest |w| a t
    saturated = gain_sorted.cumsum(1) - gain_sorted  # coordinates before k
    free_weight = weight_sorted.flip(1).cumsum(1).flip(1)  # coordinates from k on
    g_at_break = saturated + free_weight * t_sorted
    need = value.abs()[:, None]
    k = (g_at_break < need).sum(1, keepdim=True).clamp(max=z.shape[1] - 1)
    reachable = gain_sorted.sum(1, keepdim=True) >= need  # g once every coordinate is saturated
    t = (need - saturated.gather(1, k)) / free_weight.gather(1, k).clamp_min(1e-12)
    t = torch.where(reachable, t, t_sorted[:, -1:])
    return toward * torch.minimum(t * slope, room)


def fab_t(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """FAB-T: the closest misclassified point found over all target classes, kept if within ``eps``.

    With ``early_stop`` a sample stops once it has an adversarial example inside the eps-ball (it is
    already counted as broken at eps); otherwise FAB keeps shrinking the distance.

    FAB runs in float32 even inside a bfloat16 autocast region: it linearises the boundary from the
    difference of two logits, which bfloat16 rounds away exactly where FAB works, next to the boundary.

    Returns:
        x_adv with ``||x_adv - x||_norm <= eps`` and values in [0, 1] (x itself where nothing was found).
    """
    if validate:
        check_attack_inputs(model, x, y, eps, norm)
    if steps < 1 or restarts < 1 or n_target_classes < 1:
        raise InputError("fab_t needs steps >= 1, restarts >= 1 and n_target_classes >= 1")
    x = x.detach()
    best = x.clone()
    best_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    with frozen(model), torch.autocast(x.device.type, enabled=False):
        logits = float32_logits(model, x)
        correct = logits.argmax(1) == y
        best_dist[~correct] = 0.0
        order = logits.sort(dim=1, descending=True).indices
        for k in range(1, min(n_target_classes, logits.shape[1] - 1) + 1):
            for restart in range(restarts):
                unfinished = correct & (best_dist > eps) if early_stop else correct
                todo = unfinished.nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                _fab_run(
                    model,
                    x[todo],
                    y[todo],
                    order[todo, k],
                    eps,
                    norm,
                    steps,
                    alpha_max,
                    eta,
                    beta,
                    early_stop,
                    generator,
                    restart > 0,
                    todo,
                    best,
                    best_dist,
                )
    inside = best_dist <= eps
    x_adv = torch.where(per_sample(inside, x), best, x)
    return clip_to_ball(x_adv, x, eps, norm)


def _fab_run(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    norm: str,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
    early_stop: bool,
    generator: torch.Generator | None,
    random_start: bool,
    where: torch.Tensor,
    best: torch.Tensor,
    best_dist: torch.Tensor,
) -> None:
    """One FAB-T run towards ``target``; improves ``best``/``best_dist`` at ``where`` in place."""
    shape = x.shape
    flat_x = x.flatten(1)
    if random_start:
        radius = best_dist[where].clamp(max=eps) * 0.5
        if norm == "l2":
            noise = to_device(torch.randn(shape, generator=generator), x.device)
        else:
            noise = to_device(torch.rand(shape, generator=generator), x.device) * 2 - 1
        noise = noise / per_sample(lp_norm(noise, norm).clamp_min(1e-12), noise)
        start = (
            x + noise * per_sample(torch.where(radius.isfinite(), radius, torch.zeros_like(radius)), x)
        ).clamp(0, 1)
    else:
        start = x.clone()
    z = start.flatten(1)
    idx = torch.arange(x.shape[0], device=x.device)
    for _ in range(steps):
        zi = z.view(-1, *shape[1:]).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(zi)
            diff = logits.gather(1, target[idx, None]).squeeze(1) - logits.gather(1, y[idx, None]).squeeze(1)
            (grad,) = torch.autograd.grad(diff.sum(), zi)
        w = grad.flatten(1)
        # the plane <w, u> + b = 0 through the linearised boundary f_t - f_y = 0 at z
        b = diff.detach() - (w * z).sum(1)
        # both projections in one batched call (one sort instead of two)
        d_here, d_orig = project_to_hyperplane(
            torch.cat([z, flat_x[idx]]), w.repeat(2, 1), b.repeat(2), norm
        ).chunk(2)
        n_here = lp_norm(d_here, norm)
        n_orig = lp_norm(d_orig, norm)
        alpha = (n_here / (n_here + n_orig).clamp_min(1e-12)).clamp(max=alpha_max)[:, None]
        z = ((1 - alpha) * (z + eta * d_here) + alpha * (flat_x[idx] + eta * d_orig)).clamp(0, 1)
        adversarial = float32_logits(model, z.view(-1, *shape[1:])).argmax(1) != y[idx]
        dist = lp_norm(z - flat_x[idx], norm)
        rows = where[idx]
        closer = adversarial & (dist < best_dist[rows])
        best[rows] = torch.where(per_sample(closer, best[rows]), z.view(-1, *shape[1:]), best[rows])
        best_dist[rows] = torch.where(closer, dist, best_dist[rows])
        z = torch.where(adversarial[:, None], (1 - beta) * flat_x[idx] + beta * z, z)
        if early_stop:
            keep = best_dist[where[idx]] > eps
            idx, z = idx[keep], z[keep]
            if idx.numel() == 0:
                break
