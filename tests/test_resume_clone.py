"""A grid cell interrupted on one machine continues on another from the committed results directory.

The results directory of an experiment under ``benchmarks/paper-*`` is committed without weights
(.gitignore); an unfinished cell keeps ``resume.pt`` there (it holds the last and the selected weights),
so a fresh ``git clone`` elsewhere resumes the cell from its last finished epoch, and the finished cell
drops it again. Tiny data (the embedded digits), so this runs in the default suite in seconds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import robustlab
from robustlab.experiments import run_experiment
from robustlab.training import Trainer

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(robustlab.__file__).resolve().parents[1]  # the code under test, wherever the command runs
RESULTS = Path("benchmarks") / "paper-digits-test"
EXPERIMENT = {
    "name": "paper-digits-test",
    "base": {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {"epochs": 4, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "select": "val_clean"},
        "threat": {"eps": 0.1},
    },
    "grid": {"defenses": ["standard"]},
    "evaluation": {"attacks": ["fgsm"], "suite": "quick", "n": 50, "subset": "first", "audit": False},
}
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert done.returncode == 0, done.stderr
    return done.stdout


def history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_interrupted_cell_continues_in_a_fresh_clone(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    (origin / "configs").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", origin / ".gitignore")  # the project's own rules decide what is committed
    (origin / "configs" / "grid.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    git(origin, "init", "-q")

    save = Trainer._save_checkpoint

    def interrupt_after_epoch_2(self, epoch):
        save(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(origin / "configs" / "grid.yaml", origin / RESULTS, isolate=False, log=lambda _: None)
    monkeypatch.undo()
    run = next((origin / RESULTS / "runs").iterdir())
    assert [row["epoch"] for row in history(run)] == ["1", "2"]
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "half a cell")
    tracked = git(origin, "ls-files").split()
    cell = f"{RESULTS}/runs/{run.name}"
    assert f"{cell}/resume.pt" in tracked and f"{cell}/history.csv" in tracked
    assert not [f for f in tracked if f.endswith(".safetensors") or "locks/" in f]

    clone = tmp_path / "elsewhere"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    moved = clone / cell
    assert not (moved / "model.safetensors").exists()
    done = subprocess.run(
        [sys.executable, "-m", "robustlab", "experiment", "configs/grid.yaml", "--out", str(RESULTS), "--no-isolate",
         "--no-report"],
        cwd=clone, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(SOURCE)},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = history(moved)
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert rows[:2] == history(run)  # epochs 1-2 were not trained again: the same rows, timings included
    metadata = json.loads((moved / "metadata.json").read_text())
    assert metadata["status"] == "finished" and [r["from_epoch"] for r in metadata["resumes"]] == [3]
    metrics = json.loads((moved / "metrics.json").read_text())
    assert next(iter(metrics["evaluations"].values()))["samples"]["subset"] == "first-50"
    # done: the resume state is dropped, and nothing of the weights is left for git to pick up
    assert not (moved / "resume.pt").exists() and (moved / "model.safetensors").exists()
    status = git(clone, "status", "--porcelain", "--untracked-files=all").splitlines()
    assert f" D {cell}/resume.pt" in status
    assert not [line for line in status if line.endswith((".safetensors", ".pt")) and not line.startswith(" D")]
