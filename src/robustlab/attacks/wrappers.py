"""Adaptive-attack wrappers: BPDA and EOT (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients").

Both are *models* (``nn.Module``), so every gradient attack in the library (FGSM, PGD, CW, APGD, FAB,
AutoAttack) becomes adaptive by attacking the wrapper instead of the defended model:

- :class:`BPDA` (Backward Pass Differentiable Approximation, Athalye et al. 2018 §4.1): the forward pass
  runs the real, possibly non-differentiable, input transform ``g``; the backward pass replaces
  ``dg/dx`` by the identity (``g(x) ≈ x``), the straight-through estimator appropriate for
  transforms that are close to the identity (bit-depth reduction, median filters, denoisers).
- :class:`EOT` (Expectation over Transformation, Athalye et al. 2018 §4.3): for a randomised model
  ``f(x; r)`` the wrapper outputs the Monte-Carlo mean ``(1/S) Σ_s f(x; r_s)`` of the logits over
  ``samples`` draws, so the gradient an attacker sees is the gradient of that mean - the EOT estimate of
  ``∇ E_r f(x; r)`` - rather than the gradient of one noisy draw.

:func:`adaptive_model` chooses the right wrapper from what a
:class:`~robustlab.defenses.preprocessing.Defended` model declares (``differentiable``, ``random``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: draws per gradient when a model declares random outputs: the one number evaluation, ``robustlab attack``,
#: AutoAttack's ``rand`` version and the gradient-masking audit all use, so their verdicts agree
EOT_SAMPLES = 20


class _StraightThrough(torch.autograd.Function):
    """``forward(x, gx) = gx`` with gradient passed to ``x`` unchanged (identity backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return transformed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        return grad, None


class BPDA(nn.Module):
    """``model(transform(x))`` in the forward pass, ``∂transform/∂x := I`` in the backward pass.

    Works on a ``Defended`` (uses its ``.model`` and ``.transform``) or on an explicit pair. The
    forward output is exactly the defended model's output, so accuracy measured through the wrapper
    is the defence's true accuracy.
    """

    def __init__(self, defended: nn.Module, transform: nn.Module | None = None) -> None:
        super().__init__()
        if transform is None:
            if not (hasattr(defended, "model") and hasattr(defended, "transform")):
                raise TypeError(
                    "BPDA needs a Defended model (with .model and .transform) or an explicit transform"
                )
            transform, defended = defended.transform, defended.model
        self.model = defended
        self.transform = transform
        self.random = bool(getattr(transform, "random", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            transformed = self.transform(x.detach())
        return self.model(_StraightThrough.apply(x, transformed))


class EOT(nn.Module):
    """Mean logits of ``model`` over ``samples`` independent random draws (one batched forward pass).

    The batch is repeated ``samples`` times and evaluated at once, so the cost is one forward/backward
    on an ``samples``-times larger batch. Deterministic models gain nothing from it.
    """

    def __init__(self, model: nn.Module, samples: int = 20) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"EOT needs samples >= 1, got {samples}")
        self.model = model
        self.samples = int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.samples == 1:
            return self.model(x)
        logits = self.model(x.repeat(self.samples, *([1] * (x.dim() - 1))))
        return logits.view(self.samples, x.shape[0], *logits.shape[1:]).mean(0)


def adaptive_model(model: nn.Module, eot_samples: int = EOT_SAMPLES) -> tuple[nn.Module, str]:
    """The model an attacker should differentiate, and a short label of the adaptation.

    - non-differentiable transform (``model.differentiable is False``) -> :class:`BPDA`;
    - random transform (``model.random is True``) -> :class:`EOT` with ``eot_samples`` draws;
    - both -> ``EOT(BPDA(model))``, labelled ``"BPDA+EOT(20)"``; neither -> the model itself, ``"none"``.

    Models that declare nothing (plain classifiers) are treated as differentiable and deterministic.
    """
    attacked: nn.Module = model
    parts: list[str] = []
    if getattr(model, "differentiable", True) is False:
        attacked = BPDA(model)
        parts.append("BPDA")
    if getattr(model, "random", False) is True:
        attacked = EOT(attacked, eot_samples)
        parts.append(f"EOT({eot_samples})")
    return attacked, "+".join(parts) or "none"
