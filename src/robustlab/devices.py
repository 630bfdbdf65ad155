"""Device helpers that keep the host from waiting on the accelerator.

A CUDA step is fast only while the host keeps queueing work ahead of the GPU. Two things stop it:
reading a device tensor on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()``, ``.tolist()``),
and copying a host tensor from ordinary (pageable) memory to the GPU, which PyTorch makes
synchronous. Random draws in robustlab come from seeded CPU generators (the same numbers on every
device, so CPU and CUDA runs see the same random starts), so every draw is a host-to-device copy:
:func:`to_device` makes it through pinned memory, asynchronously. :func:`bf16_autocast` is the one
bfloat16 autocast context used by training (``train.amp``) and by bf16 evaluation attacks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["bf16_autocast", "to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, copied without making the host wait on a CUDA device.

    The copy goes through pinned memory with ``non_blocking=True``; PyTorch's pinned-memory cache
    keeps the staging buffer alive until the copy has run. On the CPU this is ``tensor.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def bf16_autocast(device: torch.device | str, enabled: bool = True) -> AbstractContextManager:
    """bfloat16 autocast on ``device`` (CUDA or CPU) when ``enabled``, else a no-op context.

    bfloat16 keeps float32's exponent range, so unlike float16 it needs no loss scaling; losses and
    softmax still run in float32 under autocast.
    """
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
