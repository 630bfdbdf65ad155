"""Counting host reads of tensors: the calls that make a CUDA host wait for the device.

``count_host_reads()`` patches the ``torch.Tensor`` methods through which Python code reads a tensor's
values on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``t.__index__``) to count their calls while the block runs. On a CPU these reads are cheap,
but each one in a CUDA training step or attack iteration stalls the host until the GPU has caught up;
a test that runs N steps and 4N steps and finds more reads in the second has found one per step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Count every host read of a tensor made inside the block, by method name."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
