"""Throughput of robustlab's in-memory TensorLoader vs a torchvision DataLoader pipeline, side by side.

Both produce shuffled float [0, 1] batches with random crop (padding 4) + horizontal flip, the CIFAR
training augmentation, from the same uint8 images. Usage:

    python benchmarks/bench_loader.py --dataset mnist --data-dir ../shared/data --batches 200
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from robustlab.data import TensorLoader, load_dataset


class PILDataset(Dataset):
    """The usual torchvision path: uint8 array -> PIL image -> transforms -> tensor, per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = transforms.functional.to_pil_image(self.images[index])
        return self.transform(image), self.labels[index]


def images_per_second(loader, batches: int) -> float:
    seen, started = 0, time.perf_counter()
    for i, (x, _) in enumerate(loader):
        seen += x.shape[0]
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    data = load_dataset(args.dataset, args.data_dir, val_size=0)
    images, labels = data.train.images, data.train.labels
    ours = TensorLoader(images, labels, args.batch_size, shuffle=True, augment="crop_flip")
    pipeline = transforms.Compose(
        [transforms.RandomCrop(images.shape[-1], padding=4, padding_mode="reflect"),
         transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    results = {"robustlab TensorLoader": images_per_second(ours, args.batches)}
    for workers in sorted({0, args.workers}):
        peer = DataLoader(PILDataset(images, labels, pipeline), batch_size=args.batch_size, shuffle=True,
                          num_workers=workers, persistent_workers=False)
        results[f"torchvision DataLoader (workers={workers})"] = images_per_second(peer, args.batches)
    baseline = results["robustlab TensorLoader"]
    print(f"{args.dataset}: {images.shape[0]} images {tuple(images.shape[1:])}, batch {args.batch_size}, "
          f"{args.batches} batches, torch threads {torch.get_num_threads()}")
    for name, rate in results.items():
        print(f"  {name:40s} {rate:12,.0f} img/s   robustlab / this = {baseline / rate:6.1f}x")


if __name__ == "__main__":
    main()
