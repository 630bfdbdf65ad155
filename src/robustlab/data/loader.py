"""A fast in-memory loader: uint8 tensors on the target device, batches cut and augmented on the fly.

For datasets that fit in memory (MNIST, CIFAR-10, the ImageNet subset) this avoids the per-sample
Python work of a ``torch.utils.data.DataLoader`` + PIL transform pipeline: one index permutation per
epoch, one gather per batch, random crop and flip as batched tensor ops. Benchmarked against the
torchvision pipeline in ``benchmarks/bench_loader.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from robustlab.devices import to_device

CROP_PADDING = 4


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad each image by ``padding`` (reflect) and cut a random crop of the original size, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    offsets = to_device(torch.randint(0, 2 * padding + 1, (2, n), generator=generator), x.device)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image horizontally with probability 1/2."""
    flip = to_device(torch.rand(x.shape[0], generator=generator).lt(0.5), x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class TensorLoader:
    """Iterate ``(images, labels)`` batches from uint8 tensors; images come out float32 in [0, 1].

    Shuffling and augmentation draw from a generator seeded with ``seed + epoch``, so an epoch is
    reproducible and a resumed run sees the same batches it would have seen. ``shard=(rank, world_size)``
    (data-parallel training, :mod:`robustlab.distributed`) yields rows ``rank::world_size`` of each batch
    one process would yield, augmented as that process would augment them.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: str = "none",
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"TensorLoader expects uint8 images, got {images.dtype}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.shard = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = self.images.shape[0]
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = to_device(order, self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            x = self.images.index_select(0, index).float().div_(255.0)
            if self.augment in ("crop", "crop_flip"):
                x = random_crop(x, CROP_PADDING, generator)
            if self.augment in ("flip", "crop_flip"):
                x = random_flip(x, generator)
            y = self.labels.index_select(0, index)
            rank, world_size = self.shard
            yield (x, y) if world_size == 1 else (x[rank::world_size], y[rank::world_size])
