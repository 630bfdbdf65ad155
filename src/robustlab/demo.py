"""``robustlab demo``: a small end-to-end study on the embedded ``digits`` data (no download).

Trains each requested defence (LeNet-5, a few epochs) and prints clean, FGSM and PGD test accuracy side
by side. Runs in well under a minute per defence on two CPU cores.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from robustlab.attacks import fgsm, pgd
from robustlab.config import build_config
from robustlab.defenses import DEFENSES
from robustlab.metrics import accuracy, robust_accuracy
from robustlab.runs import prepare_data
from robustlab.training import train

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
    """Train every available demo defence on digits and return one row of test metrics per defence."""
    rows = []
    defenses = [d for d in DEMO_DEFENSES if d in DEFENSES]
    data = None
    for defense in defenses:
        config = build_config(demo_config(defense, epochs, eps, seed))
        data = data or prepare_data(config)
        result = train(config, Path(out) / defense, overwrite=overwrite, progress=progress, data=data)
        model = result.model.eval()
        rows.append({
            "defense": defense,
            "clean": accuracy(model, data.test),
            "fgsm": robust_accuracy(model, data.test, partial(fgsm, eps=eps)),
            "pgd-20": robust_accuracy(model, data.test, partial(pgd, eps=eps, steps=20, early_stop=True)),
            "seconds": result.metrics["cost"]["train_seconds"],
        })
    return rows
