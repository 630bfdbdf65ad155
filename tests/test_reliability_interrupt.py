"""Interruption: a real ``robustlab train`` process killed with SIGKILL resumes on rerun.

The kill points are the dangerous ones: between the writes of one epoch's checkpoint (weights written,
optimiser state not yet), and at random moments of an epoch. After the rerun the run must have every
epoch exactly once, every file must parse, and the weights must equal those of an uninterrupted run
(training on CPU with one thread is deterministic, and the resume restores every RNG).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustlab.rundir import read_csv
from tests.reliability_support import (
    KILL_AT_REPLACE,
    ROOT,
    TINY_TRAIN,
    assert_one_error_line,
    assert_run_files_parse,
    main_in_process,
    run_cli,
    run_main,
    run_python,
    subprocess_env,
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The same tiny run, uninterrupted, trained in this process with one thread (like the subprocesses)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_main([*TINY_TRAIN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_as_reference(run: Path, reference: Path) -> None:
    history, expected = read_csv(run / "history.csv"), read_csv(reference / "history.csv")
    assert [r["epoch"] for r in history] == [r["epoch"] for r in expected]
    for name in ("last.safetensors", "model.safetensors"):
        got, want = load_file(run / name), load_file(reference / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{name}:{key}")
    assert [r.get("val_clean_acc") for r in history] == [r.get("val_clean_acc") for r in expected]


def test_sigkill_mid_checkpoint_write_resumes_exactly(tmp_path, reference_run):
    """Killed between epoch 2's weights and its optimiser state being written: epoch 2 is redone, no loss."""
    out = tmp_path / "run"
    killed = run_python(KILL_AT_REPLACE, ["resume.pt", "2", *TINY_TRAIN, "--out", str(out)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_run_files_parse(out)
    assert len(read_csv(out / "history.csv")) >= 1

    resumed = run_cli([*TINY_TRAIN, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert_run_files_parse(out)
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    assert_same_as_reference(out, reference_run)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("filename", "nth"),
    [
        ("last.safetensors", 2),  # epoch 2's weights not yet renamed into place
        ("history.csv", 3),  # epoch 3: weights written, history not
        ("model.safetensors", 1),  # the first selected checkpoint
        ("metrics.json", 1),  # all epochs done, final evaluation being written
        ("metadata.json", 2),  # the "finished" status being written
    ],
)
def test_sigkill_at_every_write_resumes_exactly(tmp_path, reference_run, filename, nth):
    out = tmp_path / "run"
    killed = run_python(KILL_AT_REPLACE, [filename, str(nth), *TINY_TRAIN, "--out", str(out)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_run_files_parse(out)
    resumed = run_cli([*TINY_TRAIN, "--out", str(out)])
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert_run_files_parse(out)
    assert_same_as_reference(out, reference_run)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    """Kill a longer run at random moments (start-up, mid-epoch, mid-write) four times, then let it finish."""
    args = [
        "train", "--dataset", "digits", "--batch-size", "32", "--epochs", "6", "--no-progress",
        "--set", "data.val_size=100", "--set", "data.test_subset=100",
    ]
    reference = tmp_path / "reference"
    assert run_cli([*args, "--out", str(reference)]).returncode == 0
    out, rng, epochs_seen = tmp_path / "run", random.Random(7), []
    code = "from robustlab.cli import main; main()"
    for _ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args, "--out", str(out)], env=subprocess_env(), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        while process.poll() is None and not (out / "metadata.json").exists():  # wait out the imports
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert "Traceback" not in process.stderr.read()
        process.stderr.close()
        assert_run_files_parse(out)
        epochs_seen.append(len(read_csv(out / "history.csv")))
    assert epochs_seen == sorted(epochs_seen), "a kill lost an epoch that had finished"
    finished = run_cli([*args, "--out", str(out)])
    assert finished.returncode == 0, finished.stderr
    assert_run_files_parse(out)
    assert_same_as_reference(out, reference)


def test_a_run_that_never_finished_an_epoch_accepts_a_corrected_config(tmp_path, capsys):
    """A start that failed (no data) must not block the corrected command; a run with epochs still does."""
    out = tmp_path / "run"
    missing = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(out)]
    code, _, err = main_in_process(missing, capsys)
    assert_one_error_line(code, err, "--data-dir")
    code, _, err = main_in_process([*TINY_TRAIN, "--out", str(out)], capsys)
    assert code == 0, err
    (out / "metadata.json").write_text(json.dumps({**json.loads((out / "metadata.json").read_text()), "status": "x"}))
    code, _, err = main_in_process([*TINY_TRAIN, "--lr", "0.02", "--out", str(out)], capsys)
    assert_one_error_line(code, err, "different config")


def _interruptible() -> None:
    """In the child before exec: SIGINT's default disposition, as in a terminal.

    A test run started in the background of a non-interactive shell (nohup, ``&``) inherits SIGINT as
    ignored; exec keeps an ignored signal ignored, so Python would install no KeyboardInterrupt handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path):
    """SIGINT mid-run: the "rerun the same command to resume" hint, status 130, no traceback, files intact."""
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--batch-size", "32", "--epochs", "500", "--no-progress",
            "--set", "data.val_size=50", "--set", "data.train_subset=64", "--set", "data.test_subset=50"]
    process = subprocess.Popen(
        [sys.executable, "-c", "from robustlab.cli import main; main()", *args, "--out", str(out)],
        env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_interruptible,
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and not (out / "history.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err, err
    assert_run_files_parse(out)
    assert 1 <= len(read_csv(out / "history.csv")) < 500
    assert json.loads((out / "metadata.json").read_text())["status"] == "running"
