"""Carry CIFAR-10 to a machine that cannot download it, in parts small enough for a size-limited transfer.

The accelerator machine of ``benchmarks/gpu/run.sh`` has no network and takes at most 64 MiB per call,
while torchvision's ``cifar-10-batches-py`` is 178 MiB (it hardly compresses with gzip or xz). Each batch
file is a pickle whose image array is one contiguous block of bytes, so this script stores the bytes
around that block with xz and the images as a lossless WebP mosaic (about 0.55 of the raw size), in two
parts of about 51 MiB::

    python benchmarks/gpu/pack_cifar10.py pack ../shared/data/cifar-10-batches-py .gpudata
    python benchmarks/gpu/pack_cifar10.py unpack .gpudata/cifar10-part1 .gpudata/cifar10-part2 /tmp/data

``unpack`` rebuilds every file byte for byte and checks it against torchvision's md5 list, so the
result is the dataset torchvision loads with ``download=False``; it stops with an error otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import math
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

PARTS = {  # about 51 MiB each, so each fits a 64 MiB transfer beside the repository
    "cifar10-part1": ["data_batch_1", "data_batch_2", "data_batch_3"],
    "cifar10-part2": ["data_batch_4", "data_batch_5", "test_batch", "batches.meta"],
}
SIDE = 32  # a batch of n images is a sqrt(n) x sqrt(n) mosaic of 32 x 32 tiles (10,000: 3200 x 3200 pixels)


def _pack_file(source: Path, target: Path) -> None:
    raw = source.read_bytes()
    if source.name == "batches.meta":
        (target / f"{source.name}.xz").write_bytes(lzma.compress(raw))
        return
    images = pickle.loads(raw, encoding="bytes")[b"data"]
    block = np.ascontiguousarray(images).tobytes()
    start = raw.find(block[:4096])
    tiles = math.isqrt(images.shape[0])
    if start < 0 or raw[start : start + len(block)] != block or tiles * tiles != images.shape[0]:
        raise SystemExit(f"error: {source} is not a CIFAR-10 batch laid out as torchvision ships it")
    (target / f"{source.name}.head.xz").write_bytes(lzma.compress(raw[:start]))
    (target / f"{source.name}.tail.xz").write_bytes(lzma.compress(raw[start + len(block) :]))
    hwc = images.reshape(tiles, tiles, 3, SIDE, SIDE).transpose(0, 3, 1, 4, 2).reshape(tiles * SIDE, tiles * SIDE, 3)
    Image.fromarray(hwc).save(target / f"{source.name}.webp", format="webp", lossless=True, quality=50, method=2)


def _unpack_file(part: Path, name: str) -> bytes:
    if name == "batches.meta":
        return lzma.decompress((part / f"{name}.xz").read_bytes())
    hwc = np.asarray(Image.open(part / f"{name}.webp").convert("RGB"))
    tiles = hwc.shape[0] // SIDE
    images = hwc.reshape(tiles, SIDE, tiles, SIDE, 3).transpose(0, 2, 4, 1, 3).reshape(tiles * tiles, 3 * SIDE * SIDE)
    head = lzma.decompress((part / f"{name}.head.xz").read_bytes())
    tail = lzma.decompress((part / f"{name}.tail.xz").read_bytes())
    return head + np.ascontiguousarray(images).tobytes() + tail


def pack(source: Path, out: Path) -> None:
    jobs = []
    with ProcessPoolExecutor() as pool:
        for part, names in PARTS.items():
            (out / part).mkdir(parents=True, exist_ok=True)
            jobs += [pool.submit(_pack_file, source / name, out / part) for name in names]
        for job in jobs:
            job.result()
    for part in PARTS:
        size = sum(f.stat().st_size for f in (out / part).iterdir())
        print(f"{out / part}: {size / 2**20:.1f} MiB")


def torchvision_md5() -> dict[str, str]:
    """The md5 of every file of ``cifar-10-batches-py``, as torchvision checks them."""
    from torchvision.datasets import CIFAR10

    md5 = {name: digest for name, digest in [*CIFAR10.train_list, *CIFAR10.test_list]}
    md5[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return md5


def unpack(parts: list[Path], out: Path, md5: dict[str, str] | None = None) -> None:
    md5 = md5 or torchvision_md5()
    folder = out / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in parts}
    for part, names in PARTS.items():
        if part not in by_name:
            raise SystemExit(f"error: part {part} not given (got {sorted(by_name)})")
        for name in names:
            data = _unpack_file(by_name[part], name)
            if hashlib.md5(data).hexdigest() != md5[name]:
                raise SystemExit(f"error: {name} rebuilt from {by_name[part]} does not match torchvision's md5")
            (folder / name).write_bytes(data)
    print(f"{folder}: {len(md5)} files, md5 as torchvision lists them")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="cifar-10-batches-py folder -> parts under OUT")
    packer.add_argument("source", type=Path)
    packer.add_argument("out", type=Path)
    unpacker = commands.add_parser("unpack", help="parts -> OUT/cifar-10-batches-py")
    unpacker.add_argument("parts", type=Path, nargs="+")
    unpacker.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.source, args.out)
    else:
        unpack(args.parts, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
