"""The measuring steps of ``benchmarks/gpu/run.sh`` (b, c, d); each writes its JSON under ``--out`` as it goes.

- ``throughput`` (b): ResNet-18, CIFAR-10-shaped batches: images/s of standard training at fp32, bf16,
  bf16 + channels-last and + torch.compile, robustlab's step against a minimal hand-written loop and
  the previous per-step-read path (``benchmarks/bench_train_step.py``); PGD-AT (PGD-10) at bf16 +
  channels-last; PGD-10 images/s against torchattacks on the same model and batch.
- ``cifar`` (c): PreAct-ResNet-18, CIFAR-10, eps 8/255: 15 epochs of Fast-AT, then 15 of the hybrid
  (bf16, channels-last, batch 128, one-cycle lr up to 0.2, as Wong et al. 2020 train Fast-AT); each
  evaluated with PGD-50-10 and AutoAttack (standard) on the first 1,000 test images as soon as it is
  trained; clean accuracy on all 10,000. ``--runs hybrid`` runs one of them (a later window's share).
- ``imagenet`` (d): EfficientNet-B0 on the ImageNet subset, standard and hybrid, at eps 4/255.

``--smoke`` runs the same code at toy size (LeNet-5 / small CNN, a few hundred images, one epoch,
short attacks) so that a CPU checks the whole script in seconds. A run is skipped, and its JSON says so,
when ``--deadline`` (Unix time) would pass before a run as long as the last one (training and attacks)
could finish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train_step  # noqa: E402

from robustlab.attacks import pgd  # noqa: E402
from robustlab.data import DatasetSplits, load_dataset  # noqa: E402
from robustlab.evaluation import evaluate_model  # noqa: E402
from robustlab.training import train  # noqa: E402


def data_dir() -> Path | None:
    """Where the datasets are: ``$ROBUSTLAB_DATA``, ``shared/data`` in the checkout, or ``../shared/data``."""
    for candidate in (os.environ.get("ROBUSTLAB_DATA"), ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------ (b) throughput
def throughput(out: Path, smoke: bool) -> None:
    path = out / "b_throughput.json"
    result: dict[str, Any] = {"device": device(), "torch": torch.__version__, "train_step": [], "pgd": None}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    size = ["--model", "lenet5", "--batch-size", "32", "--steps", "2", "--rounds", "1", "--warmup", "1",
            "--pgd-steps", "2"] if smoke else ["--model", "resnet18", "--batch-size", "512", "--steps", "10",
                                               "--rounds", "3", "--warmup", "3", "--pgd-steps", "10"]
    parts = [  # fastest and most wanted first; compilation (slow to start) last
        ["--defenses", "standard", "--precision", "fp32,bf16,bf16+cl"],
        ["--defenses", "pgd_at", "--precision", "bf16+cl"],
        None,  # PGD-10 against torchattacks
        ["--defenses", "standard", "--precision", "bf16+cl+compile"],
    ]
    if smoke:  # bf16 is slow on most CPUs and compilation takes minutes there: fp32 checks the code path
        parts = [["--defenses", "standard,pgd_at", "--precision", "fp32"], None]
    for part in parts:
        if part is None:
            result["pgd"] = pgd_against_torchattacks(smoke)
            write(path, result)
            continue
        parser_args = bench_train_step.parse_args([*size, "--device", device(), *part])
        done = len(result["train_step"])

        def on_row(rows: dict, done: int = done) -> None:
            result["train_step"][done:] = rows["rows"]
            write(path, result)

        bench_train_step.measure(parser_args, on_row)


def pgd_against_torchattacks(smoke: bool) -> dict[str, Any]:
    """PGD-10 (eps 8/255, step 2/255, random start) images/s: robustlab vs torchattacks, interleaved rounds."""
    try:
        import torchattacks
    except ImportError as error:
        return {"skipped": f"torchattacks is not installed ({error})"}
    from robustlab.models import build_model

    dev = torch.device(device())
    model = build_model("lenet5" if smoke else "resnet18", 10, 3, 32).to(dev).eval()
    n = 32 if smoke else 1024
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    eps, step = 8 / 255, 2 / 255
    theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=10, random_start=True)
    fns = {"robustlab": lambda: pgd(model, x, y, eps=eps, steps=10, step_size=step),
           "torchattacks": lambda: theirs(x, y)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(1 if smoke else 5):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            adv = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            with torch.no_grad():
                times.setdefault(f"{name}_accuracy", []).append(float((model(adv).argmax(1) == y).float().mean()))
    ratios = [t / o for o, t in zip(times["robustlab"], times["torchattacks"], strict=True)]
    return {"model": "lenet5" if smoke else "resnet18", "batch": n, "steps": 10, "eps": eps, "step_size": step,
            "images_per_second": {k: n / statistics.median(times[k]) for k in fns},
            "speed_vs_torchattacks": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "accuracy_on_random_labels": {k: times[f"{k}_accuracy"][-1] for k in fns}}


# ------------------------------------------------------------------------------------------ (c), (d) training
def train_run(name: str, config: dict, data: DatasetSplits, run_root: Path) -> tuple[Any, dict[str, Any]]:
    """Train ``config``; return the model and a row of what training measured."""
    started = time.perf_counter()
    result = train(config, run_root / name, progress=False, data=data, overwrite=True)
    return result.model, {
        "run": name, "defense": config["defense"], "epochs": config["train"]["epochs"],
        "clean_accuracy_full_test": result.metrics["clean_accuracy"], "test_size": result.metrics["test_size"],
        "train_seconds": round(time.perf_counter() - started, 1),
        "epoch_seconds": [r["epoch_seconds"] for r in result.history],
        "peak_memory_mb": result.metrics["cost"]["peak_memory_mb"], "history": result.history,
    }


def attack_run(model: Any, row: dict[str, Any], data: DatasetSplits, eval_n: int, attacks: list,
               suite: str | None, eps: float, batch: int) -> None:
    """Evaluate ``model`` on the first ``eval_n`` test images; add the numbers to ``row``."""
    test = data.test.head(eval_n)
    evaluation = evaluate_model(model, test, eps=eps, attacks=attacks, suite=suite, batch_size=batch, n_boot=200)
    row.update({
        "evaluated_on": f"first {len(test)} test images", "eps": eps,
        "clean_accuracy_evaluated": evaluation.clean.accuracy,
        "attacks": {label: m.accuracy for label, m in evaluation.attacks.items()},
        "worst_case": evaluation.robust_accuracy, "evaluation_seconds": round(evaluation.seconds, 1),
    })


def paper_runs(out: Path, smoke: bool, deadline: float, which: str, only: list[str] | None = None) -> None:
    """Train and attack each run in turn; a run starts only if one as long as the last (training and
    attacks) still fits before ``deadline``, so a short window ends with whole runs, not half ones."""
    path = out / ("c_cifar10.json" if which == "cifar" else "d_imagenet.json")
    runs = [("fast_at", {"name": "fast_at"}), ("hybrid", {"name": "hybrid"})] if which == "cifar" else [
        ("standard", {"name": "standard"}), ("hybrid", {"name": "hybrid"})]
    if only:
        unknown = sorted(set(only) - {run[0] for run in runs})
        if unknown:
            raise SystemExit(f"error: --runs {','.join(unknown)}: step {which} has runs {[run[0] for run in runs]}")
        runs = [run for run in runs if run[0] in only]
    root = data_dir()
    payload: dict[str, Any] = {"device": device(), "torch": torch.__version__, "runs": [], "skipped": []}
    if torch.cuda.is_available():
        payload["gpu"] = torch.cuda.get_device_name()
    dataset = "cifar10" if which == "cifar" else "imagenet-subset"
    folder = "cifar-10-batches-py" if which == "cifar" else "imagenet-subset"
    if smoke and (which == "imagenet" or root is None or not (root / folder).exists()):
        dataset = "digits"  # the smoke run checks the code path; decoding the subset's JPEGs takes too long
    elif root is None or not (root / folder).exists():
        payload["skipped"].append(f"{dataset} not found under $ROBUSTLAB_DATA, shared/data or ../shared/data")
        write(path, payload)
        return
    payload["dataset"] = dataset
    data = load_dataset(dataset, root, val_size=100 if smoke else (1000 if which == "cifar" else 500))
    if smoke:
        data = DatasetSplits(data.name, data.train.head(256), data.val, data.test.head(64), data.num_classes,
                             data.class_names, data.mean, data.std, data.default_augment, data.split_seed)
    eps = 8 / 255 if which == "cifar" else 4 / 255
    model = "lenet5" if smoke else ("preact_resnet18" if which == "cifar" else "efficientnet_b0")
    epochs = 1 if smoke else (15 if which == "cifar" else 10)
    attacks: list = [{"name": "pgd", "steps": 3, "restarts": 2}] if smoke else [
        {"name": "pgd", "steps": 50, "restarts": 10}]
    suite = None if smoke else "standard"
    if smoke:  # a short AutoAttack, same code
        attacks.append({"name": "autoattack", "steps": 3, "queries": 20})
    last = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, defense in runs:
            if time.time() + 1.1 * last > deadline:
                payload["skipped"].append(f"{name}: not enough time left for a run as long as the last ({last:.0f} s)")
                continue
            config = {
                "seed": 0,
                "data": {"dataset": dataset, "val_size": len(data.val)},
                "model": {"name": model},
                "train": {"epochs": epochs, "batch_size": 64 if smoke else 128, "optimizer": "sgd", "lr": 0.2,
                          "momentum": 0.9, "weight_decay": 5e-4, "schedule": "onecycle", "select": "last",
                          "amp": not smoke, "channels_last": not smoke, "val_robust_size": 50 if smoke else 500,
                          "val_attack_steps": 2 if smoke else 10, "device": device()},
                "threat": {"norm": "linf", "eps": eps},
                "defense": defense,
            }
            started = time.time()
            net, row = train_run(name, config, data, Path(tmp))
            payload["runs"].append(row)
            write(path, payload)
            print(f"{which} {name}: clean {row['clean_accuracy_full_test']:.4f} (all {row['test_size']}), "
                  f"train {row['train_seconds']} s", flush=True)
            attack_run(net, row, data, 64 if smoke else 1000, attacks, suite, eps, 64 if smoke else 500)
            last = time.time() - started
            write(path, payload)
            print(f"{which} {name}: worst case {row['worst_case']:.4f} on {row['evaluated_on']} "
                  f"{row['attacks']}, {row['evaluation_seconds']} s", flush=True)
    write(path, payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["throughput", "cifar", "imagenet"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="Unix time by which to stop")
    parser.add_argument("--runs", default="", help="(c), (d): only these runs, comma-separated (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    if args.step == "throughput":
        throughput(args.out, args.smoke)
    else:
        paper_runs(args.out, args.smoke, args.deadline, args.step, [r for r in args.runs.split(",") if r])


if __name__ == "__main__":
    main()
