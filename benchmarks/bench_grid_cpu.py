"""What the CPU profile of a paper grid (configs/paper/cifar10.yaml, imagenet_subset.yaml: ``cpu``) can afford.

Measures, side by side in one process (rounds interleave the candidates, so load from other users of a
shared CPU falls on all of them alike; compare ratios, not absolute seconds across machines). Times are
CPU seconds of this process (``time.process_time``): with one thread, core-seconds, the unit of a grid's
budget, which other users of a shared CPU inflate far less than wall-clock seconds:

1. ``train``: seconds per training batch (batch 128, real images of ``--dataset``, SGD step included) of standard
   training for each candidate model, and images per second.
2. ``defence``: seconds per batch of every training objective of the grid on one model, as a ratio to
   standard training measured in the same rounds.
3. ``autoattack``: seconds per *robust* image of each AutoAttack stage (standard version) and of the
   audit, per candidate model. Every image is made robust on purpose (labels = the model's own
   predictions, eps 1e-4), so each one goes through every stage at full cost: an upper bound per image
   that a grid estimate multiplies by the images still robust when each stage starts.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_grid_cpu.py --data-dir ../shared/data \\
        --models resnet18:8,resnet18:16,preact_resnet18:16,resnet18:32 --batches 6 --rounds 3
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_grid_cpu.py --dataset imagenet-subset \\
        --models efficientnet_b0:16,efficientnet_b0 --defence-model efficientnet_b0:16 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustlab.attacks.autoattack import autoattack_stages
from robustlab.audit import audit_model
from robustlab.config import build_config
from robustlab.data import load_dataset
from robustlab.defenses import TrainState, build_objective
from robustlab.defenses.preprocessing import auxiliary_loss
from robustlab.models import build_model
from robustlab.runs import prepare_model

#: Validation images carved from the training set, as the paper configs do.
VAL_SIZE = {"cifar10": 5000, "imagenet-subset": 500}

#: The training objectives of the grid (preprocessing defences train like standard plus their transform).
DEFENCES = ("standard", "pgd_at", "trades", "mart", "fast_at", "lipschitz", "hybrid", "autoencoder",
            "feature_squeezing", "noise_injection")


def candidate(spec: str, data) -> tuple[str, torch.nn.Module]:
    """``name[:width][+cl]``: ``+cl`` lays the weights out channels_last (``train.channels_last``)."""
    base, _, layout = spec.partition("+")
    name, _, width = base.partition(":")
    model = build_model(name, data.num_classes, data.channels, data.image_size, data.mean, data.std,
                        width=int(width) if width else None)
    if layout == "cl":
        model = model.to(memory_format=torch.channels_last)
    return spec, model


def train_step(model, objective, optimizer, x, y, state) -> None:
    model.train()
    loss, _ = objective.loss(model, x, y, state)
    extra = auxiliary_loss(model, x)
    if extra is not None:
        loss = loss + extra
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    state.step += 1


def timed_rounds(jobs: dict[str, callable], rounds: int, batches: int) -> dict[str, float]:
    """CPU seconds per call of every job, each run ``batches`` times per round, the jobs interleaved per round."""
    totals = dict.fromkeys(jobs, 0.0)
    for job in jobs.values():  # warm-up (allocator, first-call overheads)
        job(0)
    for r in range(rounds):
        for name, job in jobs.items():
            tic = time.process_time()
            for b in range(batches):
                job(1 + r * batches + b)
            totals[name] += time.process_time() - tic
    return {name: total / (rounds * batches) for name, total in totals.items()}


def batch_at(data, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = (index * size) % (len(data.train) - size)
    return data.train.images[start:start + size].float() / 255, data.train.labels[start:start + size]


def bench_train(data, specs: list[str], rounds: int, batches: int, size: int) -> dict[str, dict[str, float]]:
    jobs = {}
    for spec in specs:
        _, model = candidate(spec, data)
        objective = build_objective("standard", {})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        state = TrainState(epochs=1, steps_per_epoch=100, eps=8 / 255, norm="linf")

        def job(i, model=model, objective=objective, optimizer=optimizer, state=state, cl=spec.endswith("+cl")):
            x, y = batch_at(data, i, size)
            train_step(model, objective, optimizer, x.contiguous(memory_format=torch.channels_last) if cl else x, y,
                       state)

        jobs[spec] = job
    seconds = timed_rounds(jobs, rounds, batches)
    return {s: {"seconds_per_batch": round(t, 4), "images_per_cpu_second": round(size / t, 1),
                "parameters": sum(p.numel() for p in candidate(s, data)[1].parameters())}
            for s, t in seconds.items()}


def bench_defences(data, spec: str, pgd_steps: list[int], rounds: int, batches: int, size: int,
                   dataset: str) -> dict[str, float]:
    name, _, width = spec.partition(":")
    entries = [(d, {}) for d in DEFENCES if d not in ("pgd_at", "trades", "mart")]
    entries += [(f"{d}-{k}", {"steps": k}) for d in ("pgd_at", "trades", "mart") for k in pgd_steps]
    jobs = {}
    for label, params in entries:
        defence = label.split("-")[0]
        model_config = {"name": name, "width": int(width) if width else None}
        config = build_config({"data": {"dataset": dataset}, "model": model_config,
                               "defense": {"name": defence, **params}, "threat": {"eps": 8 / 255}})
        model = prepare_model(config, data)
        objective = build_objective(defence, params)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        state = TrainState(epochs=10, steps_per_epoch=100, eps=8 / 255, norm="linf",
                           generator=torch.Generator().manual_seed(0))
        state.step = 400  # past the hybrid's ramp start: its attack runs at a real budget
        objective.on_epoch_start(state)

        def job(i, model=model, objective=objective, optimizer=optimizer, state=state):
            x, y = batch_at(data, i, size)
            train_step(model, objective, optimizer, x, y, state)

        jobs[label] = job
    seconds = timed_rounds(jobs, rounds, batches)
    base = seconds["standard"]
    return {label: {"seconds_per_batch": round(t, 4), "ratio_to_standard": round(t / base, 2)}
            for label, t in seconds.items()}


def bench_autoattack(data, specs: list[str], n: int) -> dict[str, dict[str, float]]:
    """Seconds per robust image of each AutoAttack stage and of the audit (surrogate excluded)."""
    out: dict[str, dict[str, float]] = {}
    x = data.test.images[:n].float() / 255
    for spec in specs:
        _, model = candidate(spec, data)
        model.eval()
        with torch.no_grad():
            y = model(x).argmax(1)  # every image starts correct, and at eps 1e-4 stays so: full cost each
        row: dict[str, float] = {}
        for stage, attack, kwargs in autoattack_stages("standard"):
            tic = time.process_time()
            attack(model, x, y, eps=1e-4, norm="linf", generator=torch.Generator().manual_seed(0), **kwargs)
            row[stage] = round((time.process_time() - tic) / n, 3)
        row["autoattack"] = round(sum(row.values()), 3)
        tic = time.process_time()
        audit_model(model, (x, y), eps=1e-4, n=n)
        row["audit"] = round((time.process_time() - tic) / n, 3)
        out[spec] = row
        print(json.dumps({"autoattack": {spec: row}}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=sorted(VAL_SIZE))
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--models", default="resnet18:8,resnet18:16,preact_resnet18:16,resnet18:32")
    parser.add_argument("--defence-model", default="resnet18:16")
    parser.add_argument("--pgd-steps", default="2,3,5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--aa-images", type=int, default=16)
    parser.add_argument("--parts", default="train,defence,autoattack")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset(args.dataset, args.data_dir, val_size=VAL_SIZE[args.dataset])
    specs = args.models.split(",")
    parts = args.parts.split(",")
    results: dict[str, object] = {"threads": torch.get_num_threads()}
    if "train" in parts:
        results["train"] = bench_train(data, specs, args.rounds, args.batches, args.batch_size)
        print(json.dumps({"train": results["train"]}), flush=True)
    if "defence" in parts:
        steps = [int(k) for k in args.pgd_steps.split(",")]
        results["defence"] = bench_defences(data, args.defence_model, steps, args.rounds, args.batches,
                                            args.batch_size, args.dataset)
        print(json.dumps({"defence": results["defence"]}), flush=True)
    if "autoattack" in parts:
        results["autoattack"] = bench_autoattack(data, specs, args.aa_images)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
