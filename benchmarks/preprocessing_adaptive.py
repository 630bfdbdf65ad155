"""Input-preprocessing defences under plain PGD vs adaptive PGD (BPDA / EOT), on MNIST / LeNet-5.

Trains each preprocessing defence (standard cross-entropy behind the transform) on an MNIST subset,
then attacks the first ``--test`` test images with PGD-k (random start, step 2.5*eps/k) twice: on the
defended model as it is ("plain": gradients through rounding are zero, noise makes them random), and on
``robustlab.attacks.wrappers.adaptive_model(model, eot_samples)``, which picks BPDA for a
non-differentiable transform and EOT for a random one (Athalye et al. 2018). Accuracy is always
measured on the real defended model. Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/preprocessing_adaptive.py [--eps 0.3] [--subset 10000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch

from robustlab.attacks import pgd
from robustlab.attacks.wrappers import adaptive_model
from robustlab.metrics import accuracy, robust_accuracy
from robustlab.training import train

DEFENSES = [
    {"name": "standard"},
    {"name": "feature_squeezing", "bits": 1, "median": 2},
    {"name": "noise_injection", "sigma": 0.3},
    {"name": "autoencoder"},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eot", type=int, default=10)
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"MNIST train subset {args.subset}, LeNet-5, {args.epochs} epochs; PGD-{args.steps} at Linf eps {args.eps} "
          f"on the first {args.test} test images")
    print("| defence | clean % | plain PGD % | adaptive | adaptive PGD % |")
    print("|---|---|---|---|---|")
    for defense in DEFENSES:
        config = {
            "data": {"dataset": "mnist", "data_dir": args.data_dir, "train_subset": args.subset},
            "model": {"name": "lenet5"},
            "train": {"epochs": args.epochs, "batch_size": 128, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                      "select": "last"},
            "threat": {"eps": args.eps},
            "defense": defense,
        }
        with tempfile.TemporaryDirectory() as tmp:
            result = train(config, Path(tmp) / "run", progress=False)
        model = result.model.eval()
        test = result.data.test.head(args.test)
        attack = partial(pgd, eps=args.eps, steps=args.steps, generator=torch.Generator().manual_seed(0))
        plain = robust_accuracy(model, test, attack)
        attacked, label = adaptive_model(model, eot_samples=args.eot)
        adaptive = robust_accuracy(model, test, lambda m, x, y, a=attacked, f=attack: f(a, x, y))
        print(f"| {defense} | {100 * accuracy(model, test):.1f} | {100 * plain:.1f} | {label} | {100 * adaptive:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
