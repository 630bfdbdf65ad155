"""Re-run AutoAttack alone on a finished run and set it beside the run's committed per-sample arrays.

For a change to AutoAttack (here: its ``rand`` version for random defences), this measures what the
change does to a committed cell without re-running the cell's other attacks: AutoAttack runs on the
first ``--n`` of the images the cell was evaluated on (same seed, EOT, forward passes), and the new
worst case is the per-sample, per-pass minimum of the committed clean pass and attacks and the new
AutoAttack (a sample misclassified clean is not robust, as in the evaluation)::

    RUN=benchmarks/paper-cifar10-cpu/runs/cifar10-resnet18-noise_injection-eps0.03-s0
    OMP_NUM_THREADS=1 python benchmarks/reevaluate_autoattack.py $RUN --n 200

The run directory needs its weights (``model.safetensors``); nothing in it is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from robustlab.attacks.wrappers import EOT_SAMPLES
from robustlab.data import Split
from robustlab.evaluation import evaluate_model
from robustlab.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=200, help="the first N images of the cell's evaluation")
    args = parser.parse_args()
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    key, entry = next(iter(metrics["evaluations"].items()))
    arrays = np.load(args.run_dir / entry["samples"]["file"])
    label = next(name for name in entry["attacks"] if name.startswith("autoattack"))
    run = load_run(args.run_dir)
    indices = torch.from_numpy(arrays["indices"][: args.n])
    split = Split(run.data.test.images[indices], run.data.test.labels[indices])
    assert np.array_equal(split.labels.numpy(), arrays["labels"][: args.n])
    info = entry["model"]
    result = evaluate_model(run.model, split, eps=entry["threat"]["eps"], norm=entry["threat"]["norm"], attacks=[],
                            suite="standard", seed=entry["seed"], eot_samples=info.get("eot_samples") or EOT_SAMPLES,
                            random_passes=info.get("random_passes") or 1, n_boot=10)
    new = np.asarray(result.attacks[label].correct)
    old = arrays[f"correct:{label}"][:, : args.n]
    others = [arrays[f"correct:{a}"][:, : args.n] for a in entry["attacks"] if a != label]
    old_worst = arrays["correct:worst_case"][:, : args.n]
    new_worst = np.logical_and.reduce([arrays["correct:clean"][:, : args.n], *others, new])
    print(f"{args.run_dir.name} ({key}), first {args.n} evaluated images, accuracy in % (mean over passes):")
    print(f"  {label}: committed {100 * old.mean():.1f} -> now {100 * new.mean():.1f}")
    print(f"  worst case: committed {100 * old_worst.mean():.1f} -> now {100 * new_worst.mean():.1f}")
    for name in entry["attacks"]:
        if name != label:
            print(f"  {name} (committed): {100 * arrays[f'correct:{name}'][:, : args.n].mean():.1f}")


if __name__ == "__main__":
    main()
