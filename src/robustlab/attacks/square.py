"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020): score-based black-box, Linf and L2.

A random search that uses only the model's scores (no gradients), so gradient masking cannot fool it.
It minimises the margin ``z_y - max_{j != y} z_j`` (untargeted; a sample is broken once it is < 0):

- Linf (§3.1): start from vertical stripes of ±eps; at each iteration pick a random square of side
  ``s = round(sqrt(p * H * W))`` and set it, per channel, to a fresh ±eps (resampled until it changes
  the image); keep the proposal if the margin decreases.
- L2 (§3.2): start from a grid of "pseudo-Gaussian" tiles (concentric squares with weights
  ``sum_{k >= d} 1/(k+1)^2`` at Chebyshev distance d from the centre, two halves of opposite sign);
  at each iteration move the perturbation mass of a second random square into the first one (plus
  any budget left), as such a tile, and rescale the whole perturbation to L2 norm eps.

``p`` follows the paper's piecewise-constant schedule (``p_init`` halved at iterations 10, 50, 200,
500, 1000, 2000, 4000, 6000, 8000 of a 10000-query run, rescaled to ``queries``). Every sample draws
its own square positions; samples leave the batch once broken (each query counts once per sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from robustlab.attacks.core import Model, check_attack_inputs, clip_to_ball, float32_logits, frozen, per_sample
from robustlab.attacks.losses import cw_margin
from robustlab.devices import to_device
from robustlab.errors import InputError

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_size_fraction(iteration: int, queries: int, p_init: float, rescale: bool = True) -> float:
    """The paper's schedule for ``p``, the fraction of pixels changed, at ``iteration`` of ``queries``.

    The schedule is written for 10,000 queries. ``rescale`` stretches it to ``queries`` (the Square
    attack's own default); without it the iteration counts as is, so a shorter budget stops partway
    through the schedule, as in AutoAttack, whose Square runs 5,000 queries with ``resc_schedule=False``.
    """
    it = int(iteration / queries * 10000) if rescale else iteration
    halvings = sum(it > t for t in _SCHEDULE)
    return p_init / 2**halvings


def _margin(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The score Square minimises, from the float32 model: it both accepts proposals and decides broken."""
    return -cw_margin(float32_logits(model, x), y)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return to_device(torch.rand(shape, generator=generator), device)


def _signs(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return (_rand(shape, generator, device) < 0.5).float() * 2 - 1


def _square_masks(
    n: int, h: int, w: int, s: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """One random s-by-s square per sample, as a (N, 1, H, W) {0, 1} mask."""
    top = (_rand((n,), generator, device) * (h - s + 1)).floor().long()
    left = (_rand((n,), generator, device) * (w - s + 1)).floor().long()
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + s)
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1).float()


def pseudo_gaussian_tile(
    s: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The L2 attack's s-by-s update shape: two concentric-square bumps of opposite sign, unit L2 norm."""

    def bump(rows: int, cols: int) -> torch.Tensor:
        cr, cc = rows // 2, cols // 2
        radius = torch.maximum(
            (torch.arange(rows)[:, None] - cr).abs(), (torch.arange(cols)[None, :] - cc).abs()
        )
        levels = max(cr, cc) + 1
        weights = 1.0 / torch.arange(1, levels + 1, dtype=torch.float32) ** 2
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} 1/(k+1)^2
        tile = tail[radius.clamp(max=levels - 1)]
        return tile / tile.norm()

    tile = torch.cat([bump(s // 2, s), -bump(s - s // 2, s)], dim=0) if s > 1 else torch.ones(1, 1)
    tile = tile / tile.norm()
    transpose = torch.rand((), generator=generator) > 0.5  # the tile is square: a where, not a host branch
    return to_device(torch.where(transpose, tile.t(), tile), device)


def square(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    rescale_schedule: bool = True,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Untargeted Square attack with a budget of ``queries`` model evaluations per sample and restart.

    ``rescale_schedule``: see :func:`square_size_fraction` (AutoAttack turns it off).

    Returns:
        x_adv with ``||x_adv - x||_norm <= eps`` and values in [0, 1] (the lowest-margin point found).
    """
    if validate:
        check_attack_inputs(model, x, y, eps, norm)
    if queries < 1 or not 0 < p_init <= 1 or restarts < 1:
        raise InputError("square needs queries >= 1, 0 < p_init <= 1 and restarts >= 1")
    x = x.detach()
    out = x.clone()
    if eps == 0:
        return out
    init, propose = (_linf_init, _linf_proposal) if norm == "linf" else (_l2_init, _l2_proposal)
    with frozen(model):
        fooled = _margin(model, x, y) < 0
        for _ in range(restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            start = init(x[todo], eps, generator)
            out[todo], fooled[todo] = _random_search(
                model, x[todo], y[todo], start, queries,
                lambda i, xs, cur: propose(
                    xs, cur, eps, square_size_fraction(i, queries, p_init, rescale_schedule), generator
                ),
            )
    return out


def _random_search(
    model: Model, x: torch.Tensor, y: torch.Tensor, best: torch.Tensor, queries: int,
    propose: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Algorithm 1: from ``best``, keep each proposal that lowers a sample's margin.

    ``propose(i, xs, cur)`` draws query ``i``'s candidates for the still-robust originals ``xs`` at
    their current points ``cur``. A sample leaves the loop once its margin is negative (broken).
    """
    margin = _margin(model, best, y)
    for i in range(1, queries):
        todo = (margin >= 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        candidate = propose(i, x[todo], best[todo])
        new_margin = _margin(model, candidate, y[todo])
        improved = new_margin < margin[todo]
        best[todo] = torch.where(per_sample(improved, candidate), candidate, best[todo])
        margin[todo] = torch.where(improved, new_margin, margin[todo])
    return best, margin < 0


def _linf_init(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """Vertical stripes of +-eps, one sign per column and channel (paper section 3.1)."""
    n, c, _, w = x.shape
    return (x + eps * _signs((n, c, 1, w), generator, x.device)).clamp(0, 1)


def _linf_proposal(
    xs: torch.Tensor, cur: torch.Tensor, eps: float, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Set a random square of side ``round(sqrt(p H W))`` to a fresh +-eps per channel.

    A colour that leaves the image unchanged (the square already holds it, or clipping to [0, 1] undoes
    it) is replaced, for that sample only, until the image changes (paper, Algorithm 2). The
    replacement is uniform over the other colours (a random non-empty set of channel signs flipped),
    so the colour kept is still uniform over the colours that change the image, and a one-channel
    image needs at most one replacement.
    """
    m, c, h, w = xs.shape
    s = min(max(round(math.sqrt(p * h * w)), 1), h - 1)
    mask = _square_masks(m, h, w, s, generator, xs.device).bool()
    delta = cur - xs

    def paint(rows: torch.Tensor | slice, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates of ``rows`` with their squares painted ``values``, and which ones changed."""
        candidate = (xs[rows] + torch.where(mask[rows], values, delta[rows])).clamp(0, 1)
        changed = ((candidate - cur[rows]).abs() * mask[rows]).flatten(1).amax(1) > 1e-7
        return candidate, changed

    values = eps * _signs((m, c, 1, 1), generator, xs.device)
    candidate, changed = paint(slice(None), values)
    for _ in range(100):
        redo = (~changed).nonzero().squeeze(1)
        if redo.numel() == 0:
            break
        values[redo] = _other_colours(values[redo], generator)
        candidate[redo], changed[redo] = paint(redo, values[redo])
    return clip_to_ball(candidate, xs, eps, "linf")


def _other_colours(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Each (N, C, 1, 1) colour with a uniformly random non-empty subset of its channel signs flipped."""
    n, c = values.shape[:2]
    subset = (_rand((n,), generator, values.device) * (2**c - 1)).long().clamp(max=2**c - 2) + 1
    bits = (subset[:, None] >> torch.arange(c, device=values.device)) & 1
    return values * (1 - 2 * bits).to(values.dtype).view(n, c, 1, 1)


def _l2_init(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A grid of pseudo-Gaussian tiles with random signs, rescaled to L2 norm eps (paper section 3.2)."""
    n, c, h, w = x.shape
    delta = torch.zeros_like(x)
    tile_side = max(h // 5, 1)
    offset = (h - tile_side * 5) // 2 if h >= 5 else 0
    for top in range(offset, h - tile_side + 1, tile_side):
        for left in range(offset, w - tile_side + 1, tile_side):
            tile = pseudo_gaussian_tile(tile_side, generator, x.device)
            delta[:, :, top : top + tile_side, left : left + tile_side] += tile * _signs(
                (n, c, 1, 1), generator, x.device
            )
    return clip_to_ball(x + _to_sphere(delta, eps), x, eps, "l2")


def _l2_proposal(
    xs: torch.Tensor, cur: torch.Tensor, eps: float, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Move the perturbation mass of a second random square (and any unused budget) into the first."""
    m, c, h, w = xs.shape
    s = max(round(math.sqrt(p * h * w)), 3)
    s = min(s + (s % 2 == 0), h)
    delta = cur - xs
    first = _square_masks(m, h, w, s, generator, xs.device)
    second = _square_masks(m, h, w, s, generator, xs.device)
    union = torch.maximum(first, second)
    image_norm = delta.flatten(1).norm(dim=1)
    window_norm = (delta * union).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()  # per channel
    first_norm = (delta * first).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    tile = pseudo_gaussian_tile(s, generator, xs.device)
    fresh = torch.zeros_like(delta)
    fresh[first.expand_as(delta).bool()] = (tile * _signs((m, c, 1, 1), generator, xs.device)).flatten()
    old = delta * first / (first_norm + 1e-12)
    proposal = fresh + old
    proposal_norm = proposal.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    budget = ((eps**2 - image_norm**2).clamp_min(0) / c).view(-1, 1, 1, 1) + window_norm**2
    proposal = proposal / (proposal_norm + 1e-12) * budget.sqrt()
    delta = delta * (1 - union) + proposal * first
    return clip_to_ball(xs + _to_sphere(delta, eps), xs, eps, "l2")


def _to_sphere(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rescale each perturbation to L2 norm eps (the L2 attack always spends its whole budget)."""
    return delta * eps / per_sample(delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)
