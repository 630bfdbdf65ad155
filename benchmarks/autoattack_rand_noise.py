"""AutoAttack's ``rand`` version against PGD-20 through the same EOT, on a noise-injection model.

A LeNet-5 trained on the embedded digits (no download), wrapped in Gaussian input noise, evaluated by
``evaluate_model`` as ``robustlab evaluate`` would (EOT gradients, the accuracy of each column the mean
over ``--random-passes`` forward passes). A random defence's AutoAttack column should not read higher
than a 20-step PGD through the same EOT; this prints both, and the per-sample worst case::

    OMP_NUM_THREADS=1 python benchmarks/autoattack_rand_noise.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

from robustlab.data import load_dataset
from robustlab.defenses.preprocessing import Defended, GaussianNoise
from robustlab.evaluation import evaluate_model
from robustlab.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="first N test images")
    parser.add_argument("--eot-samples", type=int, default=8)
    parser.add_argument("--random-passes", type=int, default=5)
    parser.add_argument("--settings", default="0.2:0.1,0.3:0.15", help="sigma:eps pairs")
    args = parser.parse_args()
    data = load_dataset("digits", None, val_size=200)
    config = {"data": {"dataset": "digits", "val_size": 200}, "model": {"name": "lenet5"},
              "train": {"epochs": 8, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                        "select": "last"},
              "threat": {"eps": 0.1}}
    with tempfile.TemporaryDirectory() as tmp:
        model = train(config, f"{tmp}/run", progress=False, data=data).model
    print("| sigma | eps | clean | PGD-20 (EOT) | AutoAttack rand | worst case | seconds |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        sigma, eps = (float(v) for v in setting.split(":"))
        started = time.perf_counter()
        result = evaluate_model(Defended(model, GaussianNoise(sigma=sigma)), data.test, eps=eps, attacks=["pgd-20"],
                                suite="standard", n=args.n, subset="first", n_boot=10, eot_samples=args.eot_samples,
                                random_passes=args.random_passes)
        columns = [result.clean.accuracy, result.attacks["pgd-20"].accuracy,
                   result.attacks["autoattack-rand"].accuracy, result.robust_accuracy]
        print(f"| {sigma} | {eps} | " + " | ".join(f"{100 * c:.1f}" for c in columns)
              + f" | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
