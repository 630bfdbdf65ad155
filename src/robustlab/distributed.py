"""Data-parallel training across processes (one per GPU), started by ``torchrun``.

``torchrun --standalone --nproc-per-node 4 -m robustlab train ...`` starts four copies of the command;
each reads its rank from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins one process
group (NCCL on CUDA, Gloo on CPU) and trains on its share of every batch. The global batch stays
``train.batch_size``: each rank takes rows ``rank::world_size`` of the batch one process would draw, so
a multi-process run follows the single-process one (same data order, same augmentations, same
hyper-parameters), up to floating-point summation order.

Gradients are averaged by one all-reduce per step (:func:`average_gradients`) rather than by wrapping
the model in ``DistributedDataParallel``: a training defence attacks the model inside its loss (PGD,
TRADES, the hybrid), and those input-gradient passes must not trigger DDP's parameter-gradient
reduction. The price is no overlap of communication with the backward pass.

``robustlab evaluate`` and ``robustlab audit`` under ``torchrun`` split the test batches across ranks
(rank ``r`` attacks batches ``r, r + N, ...``, :func:`my_batches`; :func:`gather` brings them back to every
rank and rank 0 writes). The random draws on a batch are seeded from the batch's number
(:func:`batch_seed`), never from a stream shared across batches, so N ranks give exactly the single-process
result; see :func:`robustlab.evaluation.evaluate_model` and :func:`robustlab.audit.audit_model`.

Rank 0 validates (the hybrid's alpha comes from validation) and its objective state after each epoch
is copied to every rank. The epoch's training stats are averaged over the ranks (:func:`mean_over_ranks`)
before an objective reads them, so the hybrid's catastrophic-overfitting guard sees the train FGSM
accuracy of the whole epoch, not of one rank's share.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel group (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, prints, validates and tests; the others only train."""
        return self.rank == 0


def from_environment() -> Distributed:
    """This process's place in the group ``torchrun`` describes in the environment (without joining it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    return Distributed(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_type: str) -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (or stay a single process).

    Idempotent: a second call in the same process reuses the group.
    """
    info = from_environment()
    if info.enabled and not dist.is_initialized():
        if device_type == "cuda":  # NCCL's object collectives use the current device: one GPU per rank
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def leave() -> None:
    """Wait for every rank, then close the process group (a no-op when none was joined).

    Called once a command has succeeded on this rank. Without it, a rank that finishes first tears Gloo
    down at interpreter exit while its peers still talk to it, and the C++ runtime can abort that
    process ("terminate called without an active exception"), failing a run that succeeded.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(parameters: Iterable[nn.Parameter], loss: torch.Tensor, shard_size: int) -> torch.Tensor:
    """Replace each rank's gradients by the gradient of the global batch mean; return the global loss.

    Each rank's ``loss`` is a mean over its ``shard_size`` rows, so ``shard_size * grad`` is the sum of
    its per-row gradients; summing those (and the shard sizes) over ranks and dividing by the global
    batch size gives exactly the single-process gradient, also when the shards differ in size. One
    all-reduce carries the gradients, the loss and the row count. A non-finite loss on any rank makes
    the returned loss (a 0-d device tensor) non-finite on every rank, so all of them stop together.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    weight = float(shard_size)
    tail = torch.stack([loss.detach().float() * weight, torch.tensor(weight, device=loss.device)])
    flat = torch.cat([*(p.grad.reshape(-1).float() * weight for p in with_grad), tail])
    dist.all_reduce(flat)
    total = flat[-1]
    flat = flat / total
    offset = 0
    for p in with_grad:
        count = p.grad.numel()
        p.grad.copy_(flat[offset : offset + count].view_as(p.grad))
        offset += count
    return flat[-2]  # a device tensor: the training loop reads it with the step's other stats


def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (BatchNorm statistics) to every rank."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dense = tensor if tensor.is_contiguous() else tensor.contiguous()  # channels_last weights
            dist.broadcast(dense, src=0)
            if dense is not tensor:
                tensor.copy_(dense)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each entry over all ranks (every rank must pass the same keys)."""
    if not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    world = dist.get_world_size()
    return {k: float(v) / world for k, v in zip(keys, tensor.tolist(), strict=True)}


def my_batches(count: int, info: Distributed) -> list[int]:
    """The numbers of the batches (of ``count``) this rank works on: ``rank, rank + N, ...``."""
    return list(range(info.rank, count, info.world_size))


def batch_seed(*keys: int) -> int:
    """A seed for the random draws on one batch, from e.g. ``(seed, stream, batch number)``.

    Independent of which process handles the batch and of how many batches came before it, which is
    what makes a data-parallel evaluation or audit equal the single-process one, except for AutoAttack's
    stages: each process packs its own still-robust points into batches (:mod:`robustlab.stages`), so
    their draws depend on the number of processes. ``batch_seed(a, b, c, 0)`` equals ``batch_seed(a, b, c)``
    (NumPy's ``SeedSequence``): streams that must differ should differ in a non-zero key.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
