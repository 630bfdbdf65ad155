"""Attacks crafted under bfloat16 autocast against the same attacks in float32, on one trained model.

A LeNet-5 trained on the embedded digits (no download; eps 0.1 Linf, all 359 test images), evaluated
by ``evaluate_model`` with ``attack_precision="fp32"`` and ``"bf16"``. Under bf16 every decision an attack
takes (misclassified already, broken, closer adversarial found) must still be the float32 model's, so
the two columns should agree within noise; an attack that stops on a bf16-only success reads higher::

    OMP_NUM_THREADS=1 python benchmarks/bf16_attack_decisions.py
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from robustlab.data import load_dataset
from robustlab.evaluation import evaluate_model
from robustlab.training import train

ATTACKS = ["fab_t", "square", "cw_linf", "apgd_ce", {"name": "cw_l2", "steps": 50},
           {"name": "pgd", "steps": 20, "early_stop": True, "restarts": 2}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("digits", None, val_size=200)
    config = {"data": {"dataset": "digits", "val_size": 200}, "model": {"name": "lenet5"},
              "train": {"epochs": 8, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                        "select": "last"},
              "threat": {"eps": args.eps}}
    with tempfile.TemporaryDirectory() as tmp:
        model = train(config, f"{tmp}/run", progress=False, data=data).model.eval()
    results = {precision: evaluate_model(model, data.test, eps=args.eps, attacks=ATTACKS, suite="quick",
                                         attack_precision=precision, device="cpu", n_boot=10)
               for precision in ("fp32", "bf16")}
    print(f"| attack (eps {args.eps:g}, {len(data.test)} images) | fp32 | bf16 |")
    print("|---|---|---|")
    for label in results["fp32"].attacks:
        row = [100 * results[p].attacks[label].accuracy for p in ("fp32", "bf16")]
        print(f"| {label} | {row[0]:.1f} | {row[1]:.1f} |")
    print(f"| worst case | {100 * results['fp32'].robust_accuracy:.1f} | {100 * results['bf16'].robust_accuracy:.1f} |")


if __name__ == "__main__":
    main()
