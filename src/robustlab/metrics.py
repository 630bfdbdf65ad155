"""Batched accuracy helpers shared by training-time validation and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from robustlab.data import Split
from robustlab.memory import BatchSplitter


def iterate(
    split: Split, batch_size: int, device: torch.device, batches: Iterable[int] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield float [0, 1] image batches and labels from a uint8 split (only the numbered ``batches``)."""
    starts = range(0, len(split), batch_size) if batches is None else (b * batch_size for b in batches)
    for start in starts:
        x = split.images[start : start + batch_size].to(device).float().div_(255.0)
        yield x, split.labels[start : start + batch_size].to(device)


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Predicted classes for every image of ``split`` (CPU int64)."""
    device = device or next(model.parameters()).device
    # one host copy at the end, not one per batch: the batches queue on the device back to back
    return torch.cat([model(x).argmax(1) for x, _ in iterate(split, batch_size, device)]).cpu()


def accuracy(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Clean top-1 accuracy on ``split`` in [0, 1]."""
    return float((predict(model, split, batch_size) == split.labels).float().mean())


def chance_warning(clean_accuracy: float, num_classes: int) -> str | None:
    """A warning when clean accuracy is within a tenth of the way from chance (1 / classes) to 100%, else None.

    Such a model has not learned: its "robust accuracy" is small because its clean accuracy is, and a
    near-constant model even defeats some checks of the audit. A verdict on a finished model; training's
    running check (``stalled_at_chance``) is stricter (below 1.5x chance for several epochs), since it
    interrupts a run that may still be leaving its plateau.
    """
    chance = 1.0 / max(num_classes, 1)
    if clean_accuracy >= chance + 0.1 * (1.0 - chance):
        return None
    return (f"warning: clean accuracy {100 * clean_accuracy:.2f}% is close to chance ({100 * chance:.1f}% for "
            f"{num_classes} classes): the model has barely learned, so its robustness numbers mean little; "
            "train longer, or with adam / a higher lr (configs/digits_lenet5.yaml trains digits)")


def robust_accuracy(
    model: nn.Module,
    split: Split,
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> float:
    """Accuracy on ``attack(model, x, y)`` for every batch of ``split`` (model kept in its current mode).

    A batch that runs out of accelerator memory is split in halves and retried (``robustlab.memory``).
    """
    device = next(model.parameters()).device
    splitter = BatchSplitter()
    correct = torch.zeros((), dtype=torch.long, device=device)  # counted on the device, read once
    for x, y in iterate(split, batch_size, device):
        x_adv = splitter(lambda xs, ys: attack(model, xs, ys), x, y)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum()
    return int(correct) / max(1, len(split))
