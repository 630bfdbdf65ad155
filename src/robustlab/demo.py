"""``robustlab demo``: a small end-to-end study on the embedded ``digits`` data (no download).

Trains each requested defence (LeNet-5, a few epochs) and prints clean, FGSM and PGD test accuracy side
by side. Runs in well under a minute per defence on two CPU cores.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from robustlab.attacks import fgsm, pgd
from robustlab.config import RunConfig, build_config
from robustlab.defenses import DEFENSES
from robustlab.metrics import accuracy, robust_accuracy
from robustlab.rundir import RunDir
from robustlab.runs import load_run, prepare_data
from robustlab.training import train
from robustlab.training_state import trains_the_same

DEMO_DEFENSES = ("standard", "pgd_at", "hybrid")
# PGD-3 training suffices on 8x8 digits and keeps the whole demo well under a minute on two cores.
DEMO_PARAMS: dict[str, dict[str, Any]] = {"pgd_at": {"steps": 3}}


def demo_config(defense: str, epochs: int, eps: float, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                  "schedule": "cosine", "select": "last"},
        "threat": {"eps": eps},
        "defense": {"name": defense, **DEMO_PARAMS.get(defense, {})},
    }


def run_demo(out: str | Path, *, epochs: int = 15, eps: float = 0.1, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> list[dict[str, Any]]:
    """Train every available demo defence on digits and return one row of test metrics per defence.

    A finished run of the same demo settings in ``out`` is reused, not trained again (and whatever was
    computed on it, evaluations and audits, stays); any other finished run there is only replaced with
    ``overwrite``.
    """
    rows = []
    defenses = [d for d in DEMO_DEFENSES if d in DEFENSES]
    data = None
    for defense in defenses:
        config = build_config(demo_config(defense, epochs, eps, seed))
        data = data or prepare_data(config)
        path = Path(out) / defense
        if not overwrite and _finished_with(path, config):
            model, metrics = load_run(path).model, RunDir(path).read_metrics()
            print(f"{defense}: reusing the finished run in {path} (--overwrite trains it again)", flush=True)
        else:
            print(f"{defense}: training ({epochs} epochs) into {path}", flush=True)  # its epoch lines follow
            result = train(config, path, overwrite=overwrite, progress=progress, data=data)
            model, metrics = result.model, result.metrics
        model = model.eval()
        rows.append({
            "defense": defense,
            "clean": accuracy(model, data.test),
            "fgsm": robust_accuracy(model, data.test, partial(fgsm, eps=eps)),
            # its own generator: the random starts are the same whether the run was trained now or reused
            "pgd-20": robust_accuracy(model, data.test, partial(pgd, eps=eps, steps=20, early_stop=True,
                                                                generator=torch.Generator().manual_seed(seed))),
            "seconds": metrics["cost"]["train_seconds"],
        })
    return rows


def _finished_with(path: Path, config: RunConfig) -> bool:
    """Whether ``path`` holds a finished run that trained exactly what ``config`` trains."""
    run = RunDir(path)
    return run.exists() and run.is_finished() and trains_the_same(path, config)
