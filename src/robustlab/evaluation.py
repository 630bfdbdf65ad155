"""Evaluation of a trained run: clean accuracy on the held-out test split (extended by later work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robustlab.metrics import accuracy
from robustlab.rundir import RunDir
from robustlab.runs import load_run, select_device


def evaluate_run(run_dir: str | Path, device: str = "auto") -> dict[str, Any]:
    """Measure clean test accuracy of a run's selected weights and merge it into ``metrics.json``."""
    loaded = load_run(run_dir, select_device(device))
    with torch.no_grad():
        clean = accuracy(loaded.model, loaded.data.test)
    return RunDir(run_dir).update_metrics(clean_accuracy=clean, test_size=len(loaded.data.test))
