"""Speed of robustlab's training step against its previous statistics path and a minimal hand-written loop.

Three ways to take the same optimiser steps, on the same model (same initial weights), the same batches
(made once, already on the device) and the same SGD, measured side by side in one process:

- ``robustlab``: ``Trainer.train_step``: statistics summed on the device, read every
  ``STATS_EVERY`` steps and once at the end (the training loop's path).
- ``per-step reads``: the previous path: the same objective, but the loss and every statistic read on
  the host in every step (``loss.item()``, one ``float()`` per statistic) and the loss checked there.
- ``robustlab, second copy``: the control: the robustlab variant again, on its own copy of the model;
  the ratio of the two copies shows how far two runs of the *same* step differ here.
- ``minimal``: a hand-written loop: cross-entropy, ``zero_grad``/``backward``/``step``; for PGD-AT a
  hand-written PGD (uniform start drawn on the device, sign steps, eval-mode BatchNorm like robustlab's
  default) before it. No statistics, no schedule, no checks: the floor robustlab's step is held to.

Rounds interleave the variants in a shuffled order; each round times ``--steps`` steps per variant
(synchronising a CUDA device before reading the clock). On a CPU shared with other work,
``--clock process`` times this process's CPU time instead of the wall clock (one thread: the time
the step itself computes, without the time other processes held the cores). Reported: the median
seconds per step and, per round, the ratios robustlab / per-step reads and robustlab / minimal as speed
ratios (>= 1: robustlab is faster), median with the range over rounds. With ``--precision`` the same
comparison runs in bf16 autocast, channels-last and/or compiled; the minimal loop gets the same treatment.

Usage (the CPU numbers in benchmarks/RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --model lenet5 --steps 2 --rounds 40 --clock process

On a GPU (``benchmarks/gpu/run.sh`` runs this)::

    python benchmarks/bench_train_step.py --device cuda --model resnet18 --batch-size 512 \\
        --precision fp32,bf16,bf16+cl,bf16+cl+compile
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.config import build_config
from robustlab.data import DatasetSplits, Split
from robustlab.defenses import TrainState
from robustlab.devices import bf16_autocast
from robustlab.training import STATS_EVERY, RunningStats, Trainer

EPS = 8 / 255
PRECISIONS = {  # name -> (amp, channels_last, compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16+cl": (True, True, False),
    "bf16+cl+compile": (True, True, True),
}


def synthetic_cifar(n: int, seed: int = 0) -> DatasetSplits:
    """CIFAR-10-shaped random uint8 images: the step's speed does not depend on what the pixels show."""
    g = torch.Generator().manual_seed(seed)

    def split(size: int) -> Split:
        return Split(torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (size,), generator=g))

    return DatasetSplits("cifar10", split(n), split(16), split(16), 10, [str(i) for i in range(10)],
                         (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "none", 0)


class Robustlab:
    """``Trainer.train_step``, with the host read every ``STATS_EVERY`` steps and at the end."""

    name = "robustlab"

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.state = TrainState(epochs=1, steps_per_epoch=10**6, eps=EPS, generator=trainer.generator)
        self.running = RunningStats()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.trainer.train_step(x, y, self.state, self.running)
        if self.running.steps % STATS_EVERY == 0:
            loss, _ = self.running.read()
            if not math.isfinite(loss):
                raise RuntimeError("diverged")


class PerStepReads(Robustlab):
    """The previous step: the loss and every statistic read on the host in each step."""

    name = "per-step reads"

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t, train = self.trainer, self.trainer.config.train
        if train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t.model.train()
        with bf16_autocast(t.device, train.amp):
            loss, stats = t.objective.loss(t.model, x, y, self.state)
        stats = {k: float(v) for k, v in stats.items()}  # what the objectives returned: Python floats
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise RuntimeError("diverged")
        t.optimizer.step()
        t.scheduler.step()
        self.state.step += 1


class Minimal:
    """A hand-written loop on the same model: PGD (if any) then cross-entropy and an SGD step."""

    name = "minimal"

    def __init__(self, model: nn.Module, pgd_steps: int, amp: bool, channels_last: bool, lr: float) -> None:
        self.model, self.pgd_steps, self.amp, self.channels_last = model, pgd_steps, amp, channels_last
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.pgd_steps:
            x = self.pgd(x, y)
        self.model.train()
        with bf16_autocast(self.device, self.amp):
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def pgd(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        step = 2.5 * EPS / self.pgd_steps
        delta = torch.empty_like(x).uniform_(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(self.pgd_steps):
            delta.requires_grad_(True)
            with bf16_autocast(self.device, self.amp):
                loss = F.cross_entropy(self.model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step * grad.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()


def variants(defense: dict, precision: str, args: argparse.Namespace, data: DatasetSplits, root: Path) -> list:
    amp, channels_last, compiled = PRECISIONS[precision]
    config = build_config({
        "data": {"dataset": "cifar10", "augment": "none"},
        "model": {"name": args.model},
        "train": {"epochs": 1, "batch_size": args.batch_size, "optimizer": "sgd", "lr": 0.01, "schedule": "constant",
                  "amp": amp, "channels_last": channels_last, "compile": compiled, "device": args.device},
        "threat": {"eps": EPS},
        "defense": defense,
    })
    made = []
    initial = None
    for index, cls in enumerate((Robustlab, PerStepReads, Robustlab)):
        trainer = Trainer(config, root / f"{defense['name']}-{precision}-{index}", progress=False, data=data)
        if initial is None:
            initial = copy.deepcopy(trainer.model.state_dict())
        trainer.model.load_state_dict(initial)
        made.append(cls(trainer))
    made[2].name = "robustlab, second copy"  # the control: two copies of the same step differ by this much
    model = copy.deepcopy(made[0].trainer.model)
    if compiled:  # the deep copy of a compiled module keeps its compiled call; compile afresh all the same
        model.compile()
    made.append(Minimal(model, defense.get("steps", 0) if defense["name"] == "pgd_at" else 0, amp, channels_last,
                        lr=0.01))
    return made


def measure(args: argparse.Namespace, on_row: Callable[[dict], None] = lambda result: None) -> dict:
    """Every (defence, precision) row; ``on_row(result so far)`` after each, so a killed run keeps its rows."""
    device = torch.device(args.device)
    result = {"device": str(device), "torch": torch.__version__, "model": args.model, "batch_size": args.batch_size,
              "steps": args.steps, "rounds": args.rounds, "stats_every": STATS_EVERY,
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv), "rows": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    data = synthetic_cifar(args.batch_size * 4)
    batches = [(x.to(device).float().div_(255), y.to(device))
               for x, y in zip(data.train.images.split(args.batch_size), data.train.labels.split(args.batch_size),
                               strict=True)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.clock == "process" and device.type == "cuda":
        raise SystemExit("--clock process measures the host's CPU time; a GPU run needs --clock wall")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    result["clock"] = args.clock
    rows = result["rows"]
    defenses = {"standard": {"name": "standard"}, "pgd_at": {"name": "pgd_at", "steps": args.pgd_steps}}
    with tempfile.TemporaryDirectory() as tmp:
        for defense in (defenses[name] for name in args.defenses.split(",")):
            for precision in args.precision.split(","):
                runners = variants(defense, precision, args, data, Path(tmp))
                for runner in runners:  # warm-up: allocator, cuDNN autotuning, compilation
                    for i in range(args.warmup):
                        runner.step(*batches[i % len(batches)])
                sync()
                times: dict[str, list[float]] = {r.name: [] for r in runners}
                for _ in range(args.rounds):
                    for runner in random.sample(runners, len(runners)):
                        sync()
                        start = clock()
                        for i in range(args.steps):
                            runner.step(*batches[i % len(batches)])
                        sync()
                        times[runner.name].append((clock() - start) / args.steps)
                ours = times["robustlab"]
                label = "standard" if defense["name"] == "standard" else f"pgd_at (PGD-{args.pgd_steps})"
                rows.append({
                    "defense": label, "precision": precision,
                    "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
                    "images_per_second": {k: args.batch_size / statistics.median(v) for k, v in times.items()},
                    "speed_vs_per_step_reads": _ratios(times["per-step reads"], ours),
                    "speed_vs_minimal": _ratios(times["minimal"], ours),
                    "control_second_copy": _ratios(times["robustlab, second copy"], ours),
                })
                print(_line(rows[-1]), flush=True)
                on_row(result)
    return result


def _ratios(theirs: list[float], ours: list[float]) -> dict[str, float]:
    """Per round ``theirs / ours`` (>= 1: ours is at least as fast): median, min, max."""
    ratios = [t / o for t, o in zip(theirs, ours, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _line(row: dict) -> str:
    s, a, b, c = (row[k] for k in ("seconds_per_step", "speed_vs_per_step_reads", "speed_vs_minimal",
                                   "control_second_copy"))
    return (f"| {row['defense']} | {row['precision']} | {1000 * s['robustlab']:.1f} | {1000 * s['per-step reads']:.1f} "
            f"| {1000 * s['minimal']:.1f} | **{a['median']:.3f}** [{a['min']:.3f}, {a['max']:.3f}] "
            f"| **{b['median']:.3f}** [{b['min']:.3f}, {b['max']:.3f}] "
            f"| {c['median']:.3f} [{c['min']:.3f}, {c['max']:.3f}] |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="fp32", help=f"comma-separated: {', '.join(PRECISIONS)}")
    parser.add_argument("--defenses", default="standard,pgd_at", help="comma-separated: standard, pgd_at")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: this process's CPU time (CPU runs on a shared machine: other "
                             "processes' load does not count)")
    parser.add_argument("--json", type=Path, help="also write the results here (after every row)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    print("| defence | precision | robustlab ms/step | per-step reads ms/step | minimal ms/step "
          "| speed vs per-step reads | speed vs minimal | control: second copy |\n|---|---|---|---|---|---|---|---|",
          flush=True)
    measure(args, lambda result: args.json.write_text(json.dumps(result, indent=2)) if args.json else None)


if __name__ == "__main__":
    main()
