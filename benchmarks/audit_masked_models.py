"""Audit verdicts of deliberately masked models and honest ones as a markdown table.

Honest: a standard LeNet-5 and a PGD-trained LeNet-5 (robustlab's ``pgd_at`` defence). Masked
(Athalye et al. 2018): a quantising input layer (``FeatureSqueezing(bits=2, median=1)``, round(3x)/3)
attacked without BPDA, logits scaled by 1e4 (saturated float32 softmax), Gaussian input noise
(``GaussianNoise(0.2)``) attacked without EOT; and the same two transforms declared through
``Defended`` so the audit attacks them through BPDA / EOT, as evaluation does. The transfer surrogate
is a standard LeNet-5 trained with another seed.

    python benchmarks/audit_masked_models.py --n 200 --steps 20
    python benchmarks/audit_masked_models.py --n 200 --steps 20 --compare-early-stop

``--compare-early-stop`` audits every model twice in one process, its PGD running every step
(``early_stop=False``) and then with the evaluation's policy (``early_stop=None``: stop at the first
misclassification unless the model declares randomness), and prints both times, their ratio and
whether every check's status agrees.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from robustlab import audit_model, load_dataset, train
from robustlab.audit import CHECK_NAMES, AuditReport, train_surrogate
from robustlab.defenses.preprocessing import Defended, FeatureSqueezing, GaussianNoise


def _saturated(model: nn.Module) -> nn.Module:
    """A copy whose last layer is scaled by 1e4: float32 cross-entropy saturates (zero or huge gradients)."""
    scaled = copy.deepcopy(model)
    last = [m for m in scaled.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e4)
        last.bias.mul_(1e4)
    return scaled


def _train(defense: dict, eps: float, root: Path, data) -> nn.Module:
    config = {
        "data": {"dataset": "digits", "val_size": 200}, "model": {"name": "lenet5"}, "defense": defense,
        "train": {"epochs": 15, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                  "select": "last"},
        "threat": {"eps": eps},
    }
    return train(config, root / defense["name"], progress=False, data=data).model.eval()


def _row(name: str, report: AuditReport, seconds: float) -> str:
    statuses = " | ".join(c.status for c in report.checks)
    pgd = report.check("fgsm_vs_pgd").evidence["pgd_accuracy"]
    huge = report.check("accuracy_vs_eps").evidence["huge_accuracy"]
    grads = report.check("gradient_health").evidence
    bad = grads["nan_fraction"] + grads["vanishing_fraction"] + grads["exploding_fraction"]
    return (f"| {name} | **{report.verdict}** | {statuses} | {100 * pgd:.1f}% | {100 * huge:.1f}% | "
            f"{100 * bad:.1f}% | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--compare-early-stop", action="store_true",
                        help="time each audit with and without early stopping and compare the verdicts")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("digits", val_size=200)
    with tempfile.TemporaryDirectory() as tmp:
        standard = _train({"name": "standard"}, args.eps, Path(tmp), data)
        robust = _train({"name": "pgd_at", "steps": 5}, args.eps, Path(tmp), data)
    surrogate = train_surrogate(data, epochs=8, seed=7)
    models = {
        "standard": standard,
        "pgd_at (PGD-5 training)": robust,
        "quantiser round(3x)/3, undeclared (no BPDA)": nn.Sequential(FeatureSqueezing(2, 1), standard),
        "quantiser, Defended (BPDA)": Defended(standard, FeatureSqueezing(2, 1)),
        "logits x 1e4 (saturated softmax)": _saturated(standard),
        "Gaussian noise 0.2, undeclared (no EOT)": nn.Sequential(GaussianNoise(0.2), standard),
        "Gaussian noise 0.2, Defended (EOT-10)": Defended(standard, GaussianNoise(0.2)),
    }
    print(f"digits test split, first {args.n} images, LeNet-5, Linf eps={args.eps}, pgd-{args.steps}, "
          f"square-{args.queries}\n")
    if args.compare_early_stop:
        _compare_early_stop(models, data, args, surrogate)
        return
    print("| model | verdict | " + " | ".join(CHECK_NAMES) + f" | pgd-{args.steps} acc | eps=1 acc | bad grads | s |")
    print("|---" * (len(CHECK_NAMES) + 6) + "|")
    notes = []
    for name, model in models.items():
        start = time.perf_counter()
        report = audit_model(model, data.test, eps=args.eps, n=args.n, steps=args.steps, surrogate=surrogate,
                             square_queries=args.queries)
        print(_row(name, report, time.perf_counter() - start), flush=True)
        notes += [f"- {name}, {c.name} ({c.status}): {c.message}" for c in report.checks if c.status != "pass"]
    print("\nEvery check that did not pass:\n\n" + "\n".join(notes))


def _compare_early_stop(models: dict[str, nn.Module], data, args: argparse.Namespace, surrogate: nn.Module) -> None:
    print("| model | verdict, every step | verdict, early stop | statuses agree | PGD acc every step / early stop "
          "| s every step | s early stop | speed-up |")
    print("|---" * 8 + "|")
    for name, model in models.items():
        timed = []
        for early_stop in (False, None):
            start = time.perf_counter()
            report = audit_model(model, data.test, eps=args.eps, n=args.n, steps=args.steps, surrogate=surrogate,
                                 square_queries=args.queries, early_stop=early_stop)
            timed.append((report, time.perf_counter() - start))
        (full, full_s), (stop, stop_s) = timed
        agree = [c.status for c in full.checks] == [c.status for c in stop.checks]
        pgd = [r.check("fgsm_vs_pgd").evidence["pgd_accuracy"] for r in (full, stop)]
        print(f"| {name} | {full.verdict} | {stop.verdict} | {'yes' if agree else 'NO'} | "
              f"{100 * pgd[0]:.1f}% / {100 * pgd[1]:.1f}% | {full_s:.1f} | {stop_s:.1f} | {full_s / stop_s:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
