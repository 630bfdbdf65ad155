"""A faster copy of an eval-mode model for attacks to differentiate: the same function, fewer memory passes.

An attack spends nearly all of its time in the model's forward and backward passes (AutoAttack: 100
gradient steps per APGD target, 2 passes per FAB step, 5,000 forward queries per Square point). Two
rewrites make those passes cheaper without changing what the model computes:

- **BatchNorm folded into the convolution before it** (``torch.fx.experimental.optimization.fuse``). In
  eval mode a BatchNorm is a fixed affine map per channel, so ``conv -> bn`` is one convolution with
  rescaled weights and a bias (Ioffe & Szegedy 2015 §3.1's inference form). The backward pass loses
  BatchNorm's elementwise pass too.
- **channels_last** memory format for the weights and the input, the layout oneDNN (CPU) and cuDNN
  (GPU) convolutions prefer.

The logits agree with the original model's to float rounding (about 1e-7 relative); a verdict can differ
only for a point that sits on the decision boundary to that precision. robustlab's evaluation lets the
attacks differentiate this copy and takes every reported verdict from the model itself.
Measured speed-ups: ``benchmarks/bench_fused_model.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError


class ChannelsLastInput(nn.Module):
    """Runs ``model`` on a channels_last copy of 4-D inputs (gradients flow back to the caller's layout)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def fused_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded into convolutions, in channels_last layout.

    ``model`` is left as it was. A model that torch.fx cannot trace (data-dependent Python control
    flow) is copied unfused; only the layout changes then.

    Raises:
        ValueError: ``model`` is in train mode (its BatchNorm layers would use batch statistics, which
            cannot be folded).
    """
    if model.training:
        raise ValueError("fused_copy needs an eval-mode model: call model.eval() first")
    try:
        fast = fuse(model, inplace=False)
    except TraceError:
        fast = copy.deepcopy(model)
    fast = fast.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    return ChannelsLastInput(fast).eval()


def fused_classifier(model: nn.Module) -> nn.Module:
    """``model`` with the classifier that attacks differentiate replaced by its :func:`fused_copy`.

    - a plain classifier (one that declares neither ``differentiable`` nor ``random``): fused whole;
    - a model that puts a classifier ``.model`` behind an input transform and can rebuild itself
      around another one (``with_classifier``, as :class:`~robustlab.defenses.preprocessing.Defended`
      does): the classifier is fused, the transform kept as it is;
    - anything else: returned as given.
    """
    if hasattr(model, "with_classifier") and isinstance(getattr(model, "model", None), nn.Module):
        return model.with_classifier(fused_copy(model.model))
    if getattr(model, "differentiable", None) is None and getattr(model, "random", None) is None:
        return fused_copy(model)
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` attacks through a fused copy somewhere inside."""
    return any(isinstance(m, ChannelsLastInput) for m in model.modules())
