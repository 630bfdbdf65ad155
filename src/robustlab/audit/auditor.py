"""The model as the evaluation attacks it, and the images and accuracies the checks share (:class:`_Auditor`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robustlab import distributed
from robustlab.attacks import input_gradient, pgd
from robustlab.attacks.wrappers import BPDA, EOT
from robustlab.errors import InputError
from robustlab.models.fused import fused_classifier
from robustlab.rundir import load_tagged_arrays, save_tagged_arrays


def _declares(model: nn.Module) -> tuple[bool, bool]:
    """(non-differentiable, random) as declared by a ``Defended`` model: what evaluation adapts to."""
    return getattr(model, "differentiable", True) is False, getattr(model, "random", False) is True


def _adapted(model: nn.Module, bpda: bool, eot: int) -> nn.Module:
    """The model an attacker differentiates: BPDA through the transform, then EOT over ``eot`` draws."""
    attacked = model
    if bpda:
        try:
            attacked = BPDA(model)
        except TypeError:
            raise InputError("bpda=True needs a Defended(model, transform) to approximate") from None
    return EOT(attacked, eot) if eot > 1 else attacked




class _Auditor:
    """Holds the images, the model as attacked, and the accuracies shared between checks.

    Every measurement goes batch by batch through :meth:`per_batch`, whose random draws are seeded per
    (stream, batch): under ``torchrun`` each rank measures every N-th batch and the ranks' results are
    gathered, giving exactly the single-process audit.

    With a ``checkpoint`` file, every finished attack measurement (the per-image correctness that
    :meth:`run` caches) is saved there at once, under ``tag``; an audit started again with the same tag
    (model, images and settings) reads them back instead of attacking again. The attacks dominate an
    audit's cost (20 to 30 minutes per EfficientNet cell on a CPU core), and, seeded per batch, a measurement read
    back equals the one an uninterrupted audit makes.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        norm: str,
        seed: int,
        steps: int,
        bpda: bool,
        eot: int,
        batch_size: int,
        group: distributed.Distributed,
        fuse: bool = True,
        checkpoint: Path | None = None,
        tag: str = "",
        early_stop: bool = False,
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.early_stop = early_stop
        self.n = int(y.shape[0])
        self.eps, self.norm, self.seed, self.steps = eps, norm, seed, steps
        self.bpda, self.eot, self.batch_size, self.group = bpda, eot, batch_size, group
        # the classifier every check differentiates (through BPDA / EOT as each asks): the fused copy
        self.classifier = fused_classifier(model) if fuse else model
        self.attacked = _adapted(self.classifier, bpda, eot)
        self.checkpoint, self.tag = checkpoint, tag
        self._cache, self.resumed_seconds = _load_measurements(checkpoint, tag, x.device)
        self.resumed = len(self._cache)
        self._spent = self.resumed_seconds  # seconds of every measurement in the cache, resumed ones included

    def per_batch(
        self, measure: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, ...]], stream: int
    ) -> tuple[torch.Tensor, ...]:
        """``measure(x, y, generator)`` of every batch (per-image tensors), concatenated in image order.

        ``stream`` names the random draws: batch ``b`` gets a generator (and a global torch seed, for a
        random model's own draws) seeded from ``(seed, stream, b)``.
        """
        count = math.ceil(self.n / self.batch_size)
        mine: dict[int, tuple[torch.Tensor, ...]] = {}
        for batch in distributed.my_batches(count, self.group):
            rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            seed = distributed.batch_seed(self.seed, stream, batch)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            mine[batch] = tuple(t.detach().cpu() for t in measure(self.x[rows], self.y[rows], generator))
        if self.group.enabled:
            mine = {batch: part for rank in distributed.gather(mine) for batch, part in rank.items()}
        columns = zip(*(mine[batch] for batch in range(count)), strict=True)
        return tuple(torch.cat(column).to(self.x.device) for column in columns)

    def run(
        self, key: str, attack: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor], stream: int = 0
    ) -> torch.Tensor:
        """Per-image correctness of the *deployed* model (one stochastic pass for a random model) under
        ``attack(x, y, generator)`` (cached by ``key``)."""
        if key not in self._cache:

            def correct(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor]:
                x_adv = attack(xb, yb, generator)
                with torch.no_grad():
                    return (self.model(x_adv).argmax(1) == yb,)

            tic = time.perf_counter()
            self._cache[key] = self.per_batch(correct, stream)[0]
            self._spent += time.perf_counter() - tic
            if self.checkpoint is not None and self.group.is_main:
                _save_measurements(self.checkpoint, self.tag, self._cache, self._spent)
        return self._cache[key]

    def correct(self) -> torch.Tensor:
        """Per-image correctness on the clean images."""
        return self.run("clean", lambda xb, yb, generator: xb)

    def pgd_correct(
        self,
        eps: float,
        steps: int,
        restarts: int = 1,
        stream: int = 0,
        *,
        model: nn.Module | None = None,
        key: str | None = None,
    ) -> torch.Tensor:
        """Correctness under PGD crafted on ``model`` (default: the model as the evaluation attacks it)."""
        target = self.attacked if model is None else model

        def attack(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return pgd(target, xb, yb, eps=eps, steps=steps, norm=self.norm, restarts=restarts, generator=generator,
                       early_stop=self.early_stop, validate=False)

        return self.run(key or f"pgd-{steps}x{restarts}@{eps:g}", attack, stream)

    @property
    def huge_eps(self) -> float:
        """A budget that reaches every image: 1 in Linf, the box diagonal sqrt(C*H*W) in L2."""
        return 1.0 if self.norm == "linf" else math.sqrt(self.x[0].numel())

    def gradient_sizes(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image at the clean images as attacked: (gradient of ``loss_fn`` all finite, its dual norm
        with NaNs read as 0, the loss)."""

        def sizes(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
            grad, loss, _ = input_gradient(self.attacked, xb, yb, loss_fn)
            size = _dual_norm(torch.nan_to_num(grad, 0.0, 0.0, 0.0), self.norm)
            return torch.isfinite(grad.flatten(1)).all(1), size, loss

        finite, size, loss = self.per_batch(sizes, stream=0)
        return finite, size, loss


def _acc(correct: torch.Tensor) -> float:
    return float(correct.float().mean())


def _dual_norm(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The dual norm of the gradient: the first-order loss change per unit of ``norm`` budget."""
    return grad.flatten(1).abs().sum(1) if norm == "linf" else grad.flatten(1).norm(dim=1)


def _save_measurements(path: Path, tag: str, cache: dict[str, torch.Tensor], seconds: float) -> None:
    """Every cached per-image correctness under its key, the seconds they took, and the tag, atomically."""
    keys = sorted(cache)
    save_tagged_arrays(path, tag, {"keys": np.array(keys, dtype=str), "seconds": np.array(seconds),
                                   "correct": np.stack([cache[k].cpu().numpy() for k in keys])})


def _load_measurements(path: Path | None, tag: str, device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    """The measurements saved under ``tag`` at ``path`` and the seconds they took; none when the file is
    absent, unreadable or another audit's (the tag differs)."""
    saved = None if path is None else load_tagged_arrays(path, tag)
    if saved is None:
        return {}, 0.0
    correct = {str(k): torch.from_numpy(c).to(device) for k, c in zip(saved["keys"], saved["correct"], strict=True)}
    return correct, float(saved["seconds"])
