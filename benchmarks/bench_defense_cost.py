"""Training cost of every defence as a ratio to standard training, measured side by side in one run.

Each defence trains LeNet-5 on the same MNIST subset (default 2048 images, batch 128, 2 epochs) in
its own fresh subprocess, one after the other, so peak memory is per defence. Reported per defence:

- seconds per epoch of the training loop (the mean over epochs after the first, which pays one-off
  warm-up; validation is excluded, which is what ``history.csv``'s ``epoch_seconds`` measures),
- peak memory: on CPU the highest resident set size sampled every 5 ms during training minus the RSS
  just before training starts (the process-wide ``ru_maxrss`` would be dominated by data loading),
  on a GPU the CUDA max allocated memory,
- both as ratios to ``standard``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_defense_cost.py [--subset 2048] [--epochs 2] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

DEFENSES: dict[str, dict] = {
    "standard": {"name": "standard"},
    "pgd_at (PGD-10)": {"name": "pgd_at", "steps": 10},
    "pgd_at + AWP": {"name": "pgd_at", "steps": 10, "awp_gamma": 0.005},
    "fast_at": {"name": "fast_at"},
    "trades (PGD-10)": {"name": "trades", "steps": 10},
    "mart (PGD-10)": {"name": "mart", "steps": 10},
    "lipschitz": {"name": "lipschitz"},
    "hybrid (fgsm)": {"name": "hybrid"},
    "hybrid (pgd-2)": {"name": "hybrid", "attack": "pgd", "attack_steps": 2},
    "feature_squeezing": {"name": "feature_squeezing"},
    "noise_injection": {"name": "noise_injection"},
    "autoencoder": {"name": "autoencoder"},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(defense: dict, subset: int, epochs: int, data_dir: str, eps: float) -> dict:
    """Train one defence in this process and return its cost (called in a child process)."""
    import torch

    from robustlab.config import build_config
    from robustlab.runs import prepare_data
    from robustlab.training import Trainer, peak_memory_mb

    torch.set_num_threads(1)
    config = build_config({
        "data": {"dataset": "mnist", "data_dir": data_dir, "train_subset": subset, "val_size": 500},
        "model": {"name": "lenet5"},
        "train": {"epochs": epochs, "batch_size": 128, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                  "select": "last", "val_robust_size": 100},
        "threat": {"eps": eps},
        "defense": defense,
    })
    data = prepare_data(config)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run", progress=False, data=data)
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = _rss_mb()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                peak[0] = max(peak[0], _rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = trainer.fit()
        done.set()
        sampler.join()
    seconds = [row["epoch_seconds"] for row in result.history]
    steady = seconds[1:] or seconds
    memory = peak_memory_mb(device) if device.type == "cuda" else peak[0] - before
    return {"seconds_per_epoch": sum(steady) / len(steady), "peak_memory_mb": memory, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args.subset, args.epochs, args.data_dir, args.eps)))
        return
    rows = {}
    for label, defense in DEFENSES.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(defense), "--subset", str(args.subset),
             "--epochs", str(args.epochs), "--data-dir", args.data_dir, "--eps", str(args.eps)],
            capture_output=True, text=True, check=True,
        )
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label}: {rows[label]}", file=sys.stderr, flush=True)
    base = rows["standard"]
    print(f"MNIST subset {args.subset}, LeNet-5, batch 128, eps {args.eps}, device {base['device']}")
    print("| defence | s / epoch | x standard | peak memory MB (over pre-training RSS) | x standard |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        memory_ratio = row["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] > 0 else float("nan")
        time_ratio = row["seconds_per_epoch"] / base["seconds_per_epoch"]
        print(f"| {label} | {row['seconds_per_epoch']:.2f} | {time_ratio:.1f} "
              f"| {row['peak_memory_mb']:.0f} | {memory_ratio:.1f} |")


if __name__ == "__main__":
    main()
