"""Universal adversarial patch (Brown et al. 2017, "Adversarial Patch").

One square patch, optimised on training images, that lowers accuracy wherever it is pasted: each
optimisation step pastes it at a random position on a random training batch (expectation over
placements, as in the paper) and takes a signed-gradient step that raises the cross-entropy of the
true class (untargeted) or lowers that of ``target`` (targeted). It is not an eps-ball attack: the
patch replaces its pixels outright, so it is evaluated as *patched accuracy* on held-out images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustlab.attacks.core import Model, check_attack_inputs, frozen
from robustlab.errors import InputError


def _positions(
    n: int, h: int, w: int, s: int, generator: torch.Generator | None
) -> tuple[list[int], list[int]]:
    tops = torch.randint(0, h - s + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, w - s + 1, (n,), generator=generator).tolist()
    return tops, lefts


def apply_patch(
    x: torch.Tensor, patch: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Paste ``patch`` (C, s, s) onto each image of ``x`` at independent random positions (differentiable)."""
    _, _, h, w = x.shape
    s = patch.shape[-1]
    tops, lefts = _positions(x.shape[0], h, w, s, generator)
    out = x.clone()
    for i, (top, left) in enumerate(zip(tops, lefts, strict=True)):
        out[i, :, top : top + s, left : left + s] = patch
    return out


def universal_patch(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    area: float = 0.1,
    steps: int = 200,
    batch_size: int = 128,
    step_size: float = 0.05,
    target: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Optimise a square patch covering ``area`` of the image on training images ``x``, labels ``y``.

    Returns:
        the patch, shape (C, s, s) with ``s = round(sqrt(area * H * W))``, values in [0, 1].
    """
    check_attack_inputs(model, x, y, 0.0, "linf")
    if not 0 < area < 1 or steps < 0 or batch_size < 1:
        raise InputError("universal_patch needs 0 < area < 1, steps >= 0 and batch_size >= 1")
    _, c, h, w = x.shape
    s = max(1, min(round(math.sqrt(area * h * w)), h, w))
    patch = torch.rand((c, s, s), generator=generator).to(x.device)
    with frozen(model):
        for _ in range(steps):
            pick = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator).to(
                x.device
            )
            p = patch.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(apply_patch(x[pick], p, generator))
                if target is None:
                    loss = F.cross_entropy(logits, y[pick])
                else:
                    loss = -F.cross_entropy(logits, torch.full_like(y[pick], target))
                (grad,) = torch.autograd.grad(loss, p)
            patch = (patch + step_size * grad.sign()).clamp(0, 1)
    return patch.detach()


def patched_accuracy(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    patch: torch.Tensor,
    generator: torch.Generator | None = None,
) -> float:
    """Accuracy (in [0, 1]) on ``x`` with ``patch`` pasted at a random position on each image."""
    with frozen(model), torch.no_grad():
        return float((model(apply_patch(x, patch, generator)).argmax(1) == y).float().mean())
