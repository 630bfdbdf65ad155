"""Which test samples an evaluation attacks, and the names every output gives them."""

from __future__ import annotations

from typing import Any

import torch

from robustlab.data import Split
from robustlab.errors import ConfigError

#: Seed of the random test subset evaluated with ``n`` (fixed, so all runs see the same samples).
SUBSET_SEED = 0

#: How ``n`` of a split's samples are chosen: ``random`` (a fixed-seed random ``n``; a prefix of a folder
#: dataset, sorted by class, would test a few classes only) or ``first`` (the first ``n`` in the split's
#: order: RobustBench's convention on CIFAR-10, whose test batch is not sorted by class).
SUBSETS = ("random", "first")


def choose_samples(split: Split, n: int | None, how: str = "random") -> tuple[Split, torch.Tensor]:
    """The evaluated samples: all of ``split``, or ``n`` of them chosen as ``how`` says (:data:`SUBSETS`).

    Both choices are fixed (the random one by ``SUBSET_SEED``, independent of the attack seed), so every
    evaluation of the same split with the same ``n`` sees the same samples, which paired tests
    (McNemar) require.
    """
    if how not in SUBSETS:
        raise ConfigError(f"unknown subset '{how}'; valid: {', '.join(SUBSETS)}")
    if n is None or n >= len(split):
        return split, torch.arange(len(split))
    if how == "first":
        indices = torch.arange(n)
    else:
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        indices = torch.randperm(len(split), generator=generator)[:n].sort().values
    return Split(split.images[indices], split.labels[indices]), indices


#: The samples :func:`evaluate_model` attacks for a given ``n`` (default: the fixed random subset).
subset = choose_samples


def subset_name(n: int, total: int, how: str) -> str:
    """The name every output gives the evaluated samples: ``all``, ``first-1000``, ``random-1000-seed0``."""
    if n >= total:
        return "all"
    return f"first-{n}" if how == "first" else f"random-{n}-seed{SUBSET_SEED}"


def subset_text(samples: dict[str, Any]) -> str:
    """Readable sample description from an entry's ``samples``: "the first 1000 of 10000 test images"."""
    n, total, split = samples.get("n"), samples.get("of"), samples.get("split", "test")
    name = samples.get("subset") or ("all" if n == total else f"random-{n}-seed{SUBSET_SEED}")
    if name == "all":
        return f"all {n} {split} images"
    if name.startswith("first-"):
        return f"the first {n} of {total} {split} images"
    return f"a fixed random {n} of {total} {split} images (seed {name.rsplit('seed', 1)[-1]})"

