"""Out-of-memory split-and-retry: a fake attack that 'runs out of memory' above a size."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from robustlab.attacks import pgd
from robustlab.memory import BatchSplitter, OutOfMemoryError, is_out_of_memory, map_batches, split_on_oom
from robustlab.metrics import robust_accuracy


class FakeOOM:
    """Callable that raises an out-of-memory error whenever it sees more than ``capacity`` rows."""

    def __init__(self, capacity: int, error: type[BaseException] = torch.OutOfMemoryError) -> None:
        self.capacity = capacity
        self.error = error
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.capacity:
            raise self.error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x * 2 + y[:, None]


def test_oom_detection():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("size mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("capacity", [1, 3, 7, 64])
def test_map_batches_splits_and_matches_unsplit_result(capacity):
    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20.0)
    fn = FakeOOM(capacity)
    out = map_batches(fn, x, y)
    torch.testing.assert_close(out, x * 2 + y[:, None])
    assert sum(s for s in fn.sizes if s <= capacity) == 20  # only the final pass succeeds, each row once
    assert fn.sizes[0] == 20  # the whole batch is tried first


def test_splitter_remembers_the_size_that_fits():
    splitter = BatchSplitter()
    fn = FakeOOM(5, error=RuntimeError)  # a backend that raises a plain RuntimeError mentioning OOM
    x, y = torch.ones(16, 3), torch.zeros(16)
    splitter(fn, x, y)
    assert splitter.limit == 4  # 16 -> 8 -> 4
    fn.sizes.clear()
    splitter(fn, x, y)
    assert fn.sizes == [4, 4, 4, 4]  # no failed attempt on the next batch


def test_gives_a_clear_error_when_one_image_does_not_fit():
    with pytest.raises(OutOfMemoryError, match="even for a batch of 1"):
        map_batches(FakeOOM(0), torch.ones(8, 2), torch.zeros(8))


def test_other_errors_are_not_swallowed():
    def broken(x, y):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        map_batches(broken, torch.ones(4, 2), torch.zeros(4))


def test_split_on_oom_attack_splits_per_sample_kwargs(trained_digits):
    model, data = trained_digits.model, trained_digits.data
    x, y = data.test.float_images()[:12], data.test.labels[:12]
    target = (y + 1) % 10
    calls: list[int] = []

    def attack(model, x, y, *, eps, target):
        calls.append(x.shape[0])
        assert target.shape[0] == x.shape[0]
        if x.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return pgd(model, x, y, eps=eps, steps=3, random_start=False, targeted=True, target=target)

    safe = split_on_oom(attack)
    out = safe(model, x, y, eps=0.1, target=target)
    expected = pgd(model, x, y, eps=0.1, steps=3, random_start=False, targeted=True, target=target)
    torch.testing.assert_close(out, expected)
    assert calls[:2] == [12, 6] and safe.splitter.limit == 3


def test_robust_accuracy_survives_oom(trained_digits):
    """metrics.robust_accuracy splits an attack that runs out of memory and reports the same accuracy."""
    model, split = trained_digits.model, trained_digits.data.test.head(64)
    attack = partial(pgd, eps=0.1, steps=3, random_start=False)
    sizes: list[int] = []

    def flaky(model, x, y):
        sizes.append(x.shape[0])
        if x.shape[0] > 10:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return attack(model, x, y)

    expected = robust_accuracy(model, split, attack, batch_size=32)
    assert robust_accuracy(model, split, flaky, batch_size=32) == expected
    assert max(sizes) == 32 and sizes.count(32) == 1  # one failed attempt, then the remembered chunk size
