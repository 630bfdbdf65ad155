"""MNIST / LeNet-5 defences: train one defence and measure clean and PGD-40 test accuracy.

Usage (one run per call, so several can run side by side with OMP_NUM_THREADS=1)::

    python benchmarks/mnist_defenses.py --defense hybrid --eps 0.3 --epochs 10 --train-subset 20000 \
        --out runs/mnist-defenses/hybrid-0.3 [--set defense.steps=5 ...]
    python benchmarks/mnist_defenses.py --summarize runs/mnist-defenses   # markdown table of all results

Training: LeNet-5, Adam lr 1e-3, batch 128, cosine lr, no weight decay, threat Linf eps. Evaluation on
the MNIST test split: clean accuracy on all 10,000 images; PGD-40 (random start, step 2.5*eps/40, CE
loss, early stop once a sample is misclassified, which never weakens the attack) on the first
``--robust-test`` images. Writes ``benchmark.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from robustlab.attacks import pgd
from robustlab.config import load_config
from robustlab.metrics import accuracy, robust_accuracy
from robustlab.training import train


def run(args: argparse.Namespace) -> dict:
    base = {
        "seed": args.seed,
        "data": {"dataset": "mnist", "data_dir": args.data_dir, "train_subset": args.train_subset},
        "model": {"name": "lenet5"},
        "train": {"epochs": args.epochs, "batch_size": 128, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                  "schedule": "cosine", "select": "last"},
        "threat": {"eps": args.eps},
        "defense": {"name": args.defense},
    }
    config = load_config(None, args.set, base=base)
    started = time.perf_counter()
    result = train(config, args.out, overwrite=args.overwrite, progress=False)
    train_seconds = time.perf_counter() - started
    model = result.model.eval()
    test = result.data.test
    robust_split = test.head(args.robust_test)
    attack = partial(pgd, eps=args.eps, steps=40, early_stop=True, generator=torch.Generator().manual_seed(0))
    row = {
        "defense": args.defense,
        "eps": args.eps,
        "epochs": args.epochs,
        "train_images": len(result.data.train),
        "overrides": args.set,
        "clean": accuracy(model, test),
        "clean_n": len(test),
        "pgd40": robust_accuracy(model, robust_split, attack),
        "pgd40_n": len(robust_split),
        "selected_epoch": result.metrics["selected_epoch"],
        "train_seconds": round(train_seconds, 1),
    }
    Path(args.out, "benchmark.json").write_text(json.dumps(row, indent=2))
    return row


def summarize(root: Path) -> str:
    lines = [
        "| run | defence | eps | epochs | train images | clean % (n) | PGD-40 % (n) | selected epoch | train s "
        "| overrides |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(root.glob("*/benchmark.json")):
        r = json.loads(path.read_text())
        lines.append(
            f"| {path.parent.name} | {r['defense']} | {r['eps']} | {r['epochs']} | {r['train_images']} "
            f"| {100 * r['clean']:.2f} ({r['clean_n']}) | {100 * r['pgd40']:.2f} ({r['pgd40_n']}) "
            f"| {r['selected_epoch']} | {r['train_seconds']} "
            f"| {' '.join(r['overrides']) or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defense", default="standard")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--robust-test", type=int, default=2000, help="test images attacked with PGD-40")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. defense.steps=5")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--summarize", type=Path, default=None, help="print a table of every benchmark.json under DIR")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    torch.set_num_threads(1)
    args.out = args.out or Path("runs/mnist-defenses") / f"{args.defense}-{args.eps:g}"
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
