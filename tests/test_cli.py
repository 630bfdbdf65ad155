"""End-to-end CLI on the embedded digits data, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from robustlab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustlab.cli", *args], capture_output=True, text=True, timeout=300)


def test_train_then_evaluate_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--dataset", "digits", "--model", "lenet5", "--epochs", "2", "--set", "data.val_size=200",
                   "--set", "train.optimizer=adam", "--set", "train.lr=0.003", "--deterministic", "--out", str(out),
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "clean test accuracy" in done.stdout
    assert "deterministic: true" in (out / "config.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    evaluated = run_cli("evaluate", str(out), "--device", "cpu", "--suite", "quick")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{100 * metrics['clean_accuracy']:.2f}" in evaluated.stdout

    again = run_cli("train", "--dataset", "digits", "--epochs", "2", "--set", "data.val_size=200", "--set",
                    "train.optimizer=adam", "--set", "train.lr=0.003", "--out", str(out), "--no-progress")
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "mnits"], "unknown dataset 'mnits'; valid: digits, mnist"),
        (["train", "--model", "vgg"], "unknown model 'vgg'; valid: lenet5"),
        (["train", "--eps", "-1"], "threat.eps"),
        (["train", "--lr", "100"], "train.lr"),
        (["train", "--epochs", "0"], "train.epochs"),
        (["train", "--set", "train.epoch=3"], "unknown key 'train.epoch'"),
        (["evaluate", "/nonexistent/run"], "run directory not found"),
        (["demo", "--eps", "3"], "--eps=3"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    assert err.count("error:") == 1 and message in err


def test_missing_data_offline_names_data_dir(tmp_path, capsys, monkeypatch):
    import robustlab.data.sources as sources

    offline = sources._torchvision_split
    monkeypatch.setattr(sources, "_torchvision_split",
                        lambda cls, root, train, name, download: offline(cls, root, train, name, False))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--data-dir" in err and "Traceback" not in err


def test_help_lists_commands():
    done = run_cli("--help")
    assert done.returncode == 0
    for command in ("train", "evaluate", "demo"):
        assert command in done.stdout


def test_demo_prints_a_table(tmp_path):
    done = run_cli("demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "clean" in done.stdout and "PGD-20" in done.stdout and "standard" in done.stdout
    assert "upper bounds on robustness, not robustness claims" in done.stdout
    weights = (tmp_path / "demo" / "pgd_at" / "model.safetensors").read_bytes()
    again = run_cli("demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--no-progress")
    assert again.returncode == 0 and "pgd_at: reusing the finished run" in again.stdout, again.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("│")]
    assert table == [line for line in again.stdout.splitlines() if line.startswith("│")], "same runs, same numbers"
    assert (tmp_path / "demo" / "pgd_at" / "model.safetensors").read_bytes() == weights
    other = run_cli("demo", "--out", str(tmp_path / "demo"), "--epochs", "3", "--no-progress")
    assert other.returncode == 2 and "--overwrite" in other.stderr
    assert (tmp_path / "demo" / "pgd_at" / "model.safetensors").read_bytes() == weights
