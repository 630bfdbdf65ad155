"""The one training loop: run directories, best-checkpoint selection, resume, no silent overwrite."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from robustlab.errors import RobustlabError
from robustlab.rundir import RunDir, read_csv
from robustlab.runs import load_run
from robustlab.training import git_state, stalled_at_chance, train
from tests.conftest import requires_mnist, shared_data_dir


def tiny_config(**train_overrides):
    train_section = {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}
    train_section.update(train_overrides)
    return {"data": {"dataset": "digits", "val_size": 200}, "model": {"name": "lenet5"}, "train": train_section,
            "threat": {"eps": 0.1}}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_says_whether_the_code_that_ran_was_modified(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}, "not a checkout"
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = git_state(tmp_path)
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["git_dirty"] is True


def test_run_directory_contents(tmp_path, digits):
    result = train(tiny_config(), tmp_path / "run", progress=False, data=digits)
    run = RunDir(result.run_dir)
    for path in (run.config, run.metadata, run.history, run.weights, run.metrics, run.last_weights, run.resume):
        assert path.exists(), path
    metadata = json.loads(run.metadata.read_text())
    assert metadata["status"] == "finished" and metadata["seed"] == 0
    assert metadata["environment"]["torch"] == torch.__version__
    assert {"git_commit", "git_dirty"} <= set(metadata["environment"])
    assert set(metadata["data"]["hashes"]) == {"train", "val", "test"}
    history = read_csv(run.history)
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_loss", "val_clean_acc", "lr", "epoch_seconds", "peak_memory_mb"} <= set(history[0])
    config = yaml.safe_load(run.config.read_text())
    assert config["train"]["epochs"] == 2
    metrics = json.loads(run.metrics.read_text())
    assert 0.5 < metrics["clean_accuracy"] <= 1.0
    assert metrics["cost"]["train_seconds"] > 0


def test_run_saved_with_a_retired_config_key_still_loads(tmp_path, digits):
    result = train(tiny_config(epochs=1), tmp_path / "run", progress=False, data=digits)
    run = RunDir(result.run_dir)
    config = yaml.safe_load(run.config.read_text())
    config["train"]["log_every"] = 50  # a field older versions wrote
    run.config.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="retired config key 'train.log_every'"):
        loaded = load_run(result.run_dir)
    assert loaded.config.train.epochs == 1


def test_training_learns(tmp_path, digits):
    result = train(tiny_config(epochs=6), tmp_path / "run", progress=False, data=digits)
    assert result.metrics["clean_accuracy"] > 0.85


def test_stalled_at_chance_needs_three_chance_epochs_in_a_row():
    rows = [{"val_clean_acc": a} for a in (0.11, 0.12, 0.9, 0.1, 0.1)]
    assert not stalled_at_chance(rows, num_classes=10)
    assert stalled_at_chance([*rows, {"val_clean_acc": 0}], num_classes=10)
    assert not stalled_at_chance([*rows, {"val_clean_acc": 0.15}], num_classes=10), "1.5x chance is learning"
    assert not stalled_at_chance(rows[-2:], num_classes=10)


def test_training_stuck_at_chance_is_reported_once_while_it_runs(tmp_path, digits, monkeypatch, capsys):
    monkeypatch.setattr("robustlab.training.accuracy", lambda model, split, *a, **k: 0.1)  # a stalled network
    small = dataclasses.replace(digits, train=digits.train.head(256))
    result = train(tiny_config(epochs=4), tmp_path / "run", progress=False, data=small)
    events = [row.get("events") or "" for row in read_csv(RunDir(result.run_dir).history)]
    assert ["stalled" in e for e in events] == [False, False, True, False]
    assert capsys.readouterr().err.count("warning:") == 1 and "defense.eps_warmup" in events[2]


def test_finished_run_is_never_overwritten_silently(tmp_path, digits):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False, data=digits)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(RobustlabError, match="--overwrite"):
        train(tiny_config(epochs=1), tmp_path / "run", progress=False, data=digits)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    broken = {**tiny_config(epochs=1), "data": {"dataset": "npz:" + str(tmp_path / "missing.npz")}}
    with pytest.raises(RobustlabError, match="not found"):
        train(broken, tmp_path / "run", progress=False, overwrite=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before, "--overwrite deleted a run for nothing"
    train(tiny_config(epochs=1, lr=0.001), tmp_path / "run", progress=False, data=digits, overwrite=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() != before


def test_resume_after_kill_between_epochs_matches_uninterrupted(tmp_path, digits, monkeypatch):
    import robustlab.training as training

    reference = train(tiny_config(epochs=3, schedule="piecewise"), tmp_path / "ref", progress=False, data=digits)

    calls = {"n": 0}
    original = training.Trainer._save_checkpoint

    def crash_after_second_epoch(self, epoch):
        original(self, epoch)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "_save_checkpoint", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=3, schedule="piecewise"), tmp_path / "run", progress=False, data=digits)
    monkeypatch.setattr(training.Trainer, "_save_checkpoint", original)
    assert not RunDir(tmp_path / "run").is_finished()
    resumed = train(tiny_config(epochs=3, schedule="piecewise"), tmp_path / "run", progress=False, data=digits)
    ref_rows, rows = read_csv(reference.run_dir / "history.csv"), read_csv(resumed.run_dir / "history.csv")
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in ref_rows], rel=1e-4)
    assert resumed.metrics["clean_accuracy"] == pytest.approx(reference.metrics["clean_accuracy"])
    epochs = [line.split(",")[0] for line in (resumed.run_dir / "history.csv").read_text().splitlines()]
    assert epochs == ["epoch", "1", "2", "3"], "rows rewritten on resume must keep their integer epochs"


def test_unfinished_run_with_other_config_is_refused(tmp_path, digits, monkeypatch):
    import robustlab.training as training

    monkeypatch.setattr(training.Trainer, "_finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=1), tmp_path / "run", progress=False, data=digits)
    with pytest.raises(RobustlabError, match="different config"):
        train(tiny_config(epochs=2), tmp_path / "run", progress=False, data=digits)


def test_an_unfinished_run_resumes_across_a_change_of_memory_layout(tmp_path, digits, monkeypatch):
    """``train.channels_last``, like ``train.device``, changes how a run executes, not what it trains."""
    import robustlab.training as training
    from robustlab.config import build_config, trained_identity

    monkeypatch.setattr(training.Trainer, "_finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=2), tmp_path / "run", progress=False, data=digits)
    monkeypatch.undo()
    resumed = train(tiny_config(epochs=2, channels_last=True), tmp_path / "run", progress=False, data=digits)
    assert RunDir(resumed.run_dir).is_finished() and len(resumed.history) == 2
    same = trained_identity(build_config(tiny_config(channels_last=True, device="cpu")))
    assert same == trained_identity(build_config(tiny_config()))
    assert trained_identity(build_config(tiny_config(lr=0.01))) != trained_identity(build_config(tiny_config()))


def test_best_checkpoint_is_selected_on_validation(tmp_path, digits):
    result = train(tiny_config(epochs=3, select="val_clean"), tmp_path / "run", progress=False, data=digits)
    rows = read_csv(result.run_dir / "history.csv")
    best = max(rows, key=lambda r: r["val_clean_acc"])
    assert result.metrics["selected_epoch"] == max(int(r["epoch"]) for r in rows if r.get("selected"))
    loaded = load_run(result.run_dir)
    from robustlab.metrics import accuracy

    assert accuracy(loaded.model, loaded.data.val) == pytest.approx(best["val_clean_acc"])


def test_adversarial_training_keeps_a_full_eps_robust_checkpoint_after_a_warmup(tmp_path, digits):
    """``select: auto`` on PGD-AT: best validation robust accuracy, never an epoch of the eps warm-up."""
    config = tiny_config(epochs=4)
    config["defense"] = {"name": "pgd_at", "steps": 2, "eps_warmup": 2}
    result = train(config, tmp_path / "run", progress=False, data=digits)
    rows = read_csv(result.run_dir / "history.csv")
    assert all("val_robust_acc" in r for r in rows), "auto selection measures validation robust accuracy"
    # eps_t is logged at the end of an epoch: the warm-up reaches eps 0.1 as epoch 2 ends
    assert rows[0]["eps_t"] < 0.1 and rows[1]["eps_t"] == pytest.approx(0.1)
    full = [r for r in rows if r["epoch"] > 2]
    best = max(full, key=lambda r: r["val_robust_acc"])
    assert result.metrics["selected_epoch"] == best["epoch"]
    from robustlab.metrics import accuracy

    loaded = load_run(result.run_dir)
    assert accuracy(loaded.model, loaded.data.val) == pytest.approx(best["val_clean_acc"])


def test_explicit_select_is_kept_for_adversarial_training(tmp_path, digits):
    config = tiny_config(epochs=2, select="last")
    config["defense"] = {"name": "pgd_at", "steps": 1}
    result = train(config, tmp_path / "run", progress=False, data=digits)
    assert result.metrics["selected_epoch"] == 2
    assert "val_robust_acc" not in read_csv(result.run_dir / "history.csv")[0]


@pytest.mark.parametrize("schedule", ["constant", "piecewise", "cosine", "onecycle"])
def test_lr_schedules(tmp_path, digits, schedule):
    result = train(tiny_config(epochs=2, schedule=schedule, optimizer="sgd", lr=0.05), tmp_path / schedule,
                   progress=False, data=digits)
    lrs = [row["lr"] for row in result.history]
    if schedule == "constant":
        assert lrs == [0.05, 0.05]
    else:
        assert lrs[-1] < 0.05


@pytest.mark.slow
@requires_mnist
def test_lenet5_standard_training_on_mnist_reaches_98_8_in_3_epochs(tmp_path):
    from robustlab.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "mnist_lenet5.yaml",
                         [f"data.data_dir={shared_data_dir()}"])
    assert config.train.epochs <= 3
    result = train(config, tmp_path / "mnist", progress=False)
    assert result.metrics["clean_accuracy"] >= 0.988
