"""Out-of-memory resilience: split a batch in halves and retry instead of crashing.

Attacks are memory-hungry (an input-gradient graph per step, EOT samples, restarts), so a batch size
that fits for clean prediction may not fit for AutoAttack on a large model. Rather than asking the user
to guess a smaller ``--batch-size`` and rerun a long evaluation, :class:`BatchSplitter` runs ``fn`` on
the whole batch, and when the accelerator reports out-of-memory it frees the cache, halves the chunk
size, and processes the batch in chunks of that size, concatenating the results. The reduced size is
remembered for later batches (no repeated failed attempts) and the halving stops at a batch of one,
where a clear :class:`OutOfMemoryError` is raised.

Splitting changes nothing for per-sample computations (attacks treat each image independently: the
loss is summed over the batch before the input gradient is taken), except the order in which a shared
random generator is consumed.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from robustlab.errors import RobustlabError

__all__ = ["BatchSplitter", "OutOfMemoryError", "is_out_of_memory", "map_batches", "split_on_oom"]

log = logging.getLogger(__name__)

Result = TypeVar("Result", torch.Tensor, tuple)


class OutOfMemoryError(RobustlabError):
    """The computation does not fit in memory even one image at a time."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for backends that raise a RuntimeError saying 'out of memory'."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate chunk results of type {type(first).__name__}; return tensors")


class BatchSplitter:
    """Calls ``fn(*chunks)`` on row-aligned chunks of its tensor arguments, halving the chunk on OOM.

    ``max_batch`` caps the chunk size from the start (``None``: try the whole batch first). After an
    out-of-memory error the smaller size is kept in :attr:`limit` for every later call, so an
    evaluation loop pays for the failed attempt once, not once per batch.
    """

    def __init__(self, max_batch: int | None = None) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.limit = max_batch

    def __call__(self, fn: Callable[..., Result], *tensors: torch.Tensor) -> Result:
        if not tensors:
            raise ValueError("BatchSplitter needs at least one batched tensor")
        n = int(tensors[0].shape[0])
        if any(int(t.shape[0]) != n for t in tensors):
            raise ValueError("all batched tensors must have the same first dimension")
        while True:
            size = n if self.limit is None else max(1, min(self.limit, n))
            try:
                if size >= n:
                    return fn(*tensors)
                return _concat([fn(*(t[i : i + size] for t in tensors)) for i in range(0, n, size)])
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                if size == 1:
                    raise OutOfMemoryError(
                        "out of memory even for a batch of 1 image; use a smaller model or input size, "
                        "or run on a device with more memory (--device cpu uses host RAM)"
                    ) from None
                failed = size
            # retry outside the except block so the failed attempt's tensors (held by the traceback) are freed
            _free_memory()
            self.limit = failed // 2
            log.warning("out of memory on a batch of %d; retrying in chunks of %d", failed, self.limit)


def map_batches(fn: Callable[..., Result], *tensors: torch.Tensor, batch_size: int | None = None) -> Result:
    """One-off :class:`BatchSplitter`: ``fn`` over chunks of ``tensors`` of at most ``batch_size`` rows."""
    return BatchSplitter(batch_size)(fn, *tensors)


def split_on_oom(attack: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap ``attack(model, x, y, **kwargs) -> x_adv`` so an out-of-memory batch is split and retried.

    Per-sample keyword tensors (same first dimension as ``x``, e.g. a targeted attack's ``target``) are
    split along with ``x`` and ``y``. The wrapper keeps its own :class:`BatchSplitter`, so the size that
    fits is remembered across calls.
    """
    splitter = BatchSplitter()

    @functools.wraps(attack)
    def wrapper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = int(x.shape[0])
        per_sample = [
            k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
        ]
        shared = {k: v for k, v in kwargs.items() if k not in per_sample}

        def run(xs: torch.Tensor, ys: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
            return attack(model, xs, ys, **shared, **dict(zip(per_sample, extra, strict=True)))

        return splitter(run, x, y, *(kwargs[k] for k in per_sample))

    wrapper.splitter = splitter  # type: ignore[attr-defined]
    return wrapper
