"""Data-parallel training (``torchrun``) against one process: seconds per epoch and final weights.

Trains the same config twice, side by side in one invocation: once as one process, once under
``torchrun --nproc-per-node N`` (each rank on its rows of every global batch, gradients averaged by
one all-reduce per step, :mod:`robustlab.distributed`). On GPUs each rank has its own device; on a
CPU the one process gets ``--threads`` threads and each rank ``--threads / N``, so both use the same
cores. Prints seconds per epoch (mean over the epochs after the first), the speed-up, and the largest
weight difference between the two runs (float summation order only: the data order is the same).

Usage::

    python benchmarks/bench_data_parallel.py --nproc 2 --dataset mnist --data-dir ../shared/data --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def train(out: Path, args: argparse.Namespace, nproc: int) -> float:
    """Train into ``out`` with ``nproc`` processes; return the mean seconds per epoch after the first."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    command = [
        sys.executable, *launcher, "-m", "robustlab", "train", "--dataset", args.dataset, "--model", args.model,
        "--defense", args.defense, "--eps", str(args.eps), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--out", str(out), "--no-progress",
        "--set", "train.schedule=constant", *(["--data-dir", args.data_dir] if args.data_dir else []),
        *(["--set", f"data.train_subset={args.subset}"] if args.subset else []),
    ]
    threads = str(max(1, args.threads // nproc))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    with (out / "history.csv").open(newline="") as handle:
        seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
    timed = seconds[1:] or seconds
    return sum(timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--defense", default="standard")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in total")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = train(Path(tmp) / "one", args, 1)
        many = train(Path(tmp) / "many", args, args.nproc)
        a, b = load_file(Path(tmp) / "one" / "last.safetensors"), load_file(Path(tmp) / "many" / "last.safetensors")
        difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    what = f"{args.defense} {args.model}/{args.dataset}, global batch {args.batch_size}, {args.epochs} epochs"
    print(f"{what} ({device})")
    print(f"  1 process:    {one:8.2f} s/epoch")
    print(f"  {args.nproc} processes: {many:8.2f} s/epoch   speed-up {one / many:.2f}x")
    print(f"  largest weight difference after training: {difference:.2e}")


if __name__ == "__main__":
    main()
