"""Robust optimisation by Lipschitz control (the paper's "robust optimisation" baselines, §2.2).

``loss = CE(f(x), y) + grad_penalty * eps * mean_i ||grad_x CE(f(x_i), y_i)||_*
+ parseval * sum_l ||W_l W_l^T - I||_F^2``

- The input-gradient penalty is computed by double backpropagation (Drucker & LeCun 1992; Ross &
  Doshi-Velez 2018). ``||.||_*`` is the dual of the threat norm (L1 for Linf, L2 for L2), so with
  ``grad_penalty = 1`` the first two terms are the first-order expansion of the worst-case loss in the
  eps-ball (Simon-Gabriel et al. 2019, "First-order adversarial vulnerability ...").
- The Parseval term (Cisse et al. 2017) pushes every weight matrix (conv kernels flattened to
  ``out x in*k*k``) towards a tight frame, bounding each layer's spectral norm near 1. We use it as a
  soft penalty rather than Cisse et al.'s retraction step, so the training loop stays generic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from robustlab.defenses.base import LossAndStats, Objective, ObjectiveParams, TrainState, batch_accuracy


class LipschitzParams(ObjectiveParams):
    grad_penalty: float = Field(default=1.0, ge=0.0, le=1000.0, description="weight of eps * ||grad_x CE||_*")
    parseval: float = Field(default=0.0, ge=0.0, le=100.0, description="weight of the orthogonality penalty")


def parseval_penalty(model: nn.Module) -> torch.Tensor:
    """``sum_l ||W W^T - I||_F^2`` over weight tensors of dimension > 1 (the smaller Gram matrix)."""
    total = torch.zeros((), device=next(model.parameters()).device)  # made on the device: no host copy
    for p in model.parameters():
        if p.dim() < 2 or not p.requires_grad:
            continue
        w = p.flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        total = total + (gram - torch.eye(gram.shape[0], device=p.device)).pow(2).sum()
    return total


class LipschitzObjective(Objective):
    """Input-gradient-norm (double backprop) and optional Parseval penalties; see the module docstring."""

    name = "lipschitz"
    Params = LipschitzParams

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: TrainState) -> LossAndStats:
        p = self.params
        x = x.detach().requires_grad_(True)
        logits = model(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(per_sample.sum(), x, create_graph=True)
        dual = 1.0 if state.norm == "linf" else 2.0
        penalty = grad.flatten(1).norm(p=dual, dim=1).mean()
        loss = per_sample.mean() + p.grad_penalty * state.eps * penalty
        stats = {"acc": batch_accuracy(logits, y), "grad_norm": penalty.detach()}
        if p.parseval > 0:
            orthogonality = parseval_penalty(model)
            loss = loss + p.parseval * orthogonality
            stats["parseval"] = orthogonality.detach()
        return loss, {"loss": loss.detach(), **stats}
