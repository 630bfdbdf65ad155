"""Interruption (issue 7): a real ``robustlab train`` process killed with SIGKILL resumes on rerun.

The kill points are the dangerous ones: between the writes of one epoch's checkpoint (weights written,
optimiser state not yet), and at random moments of an epoch. After the rerun the run must have every
epoch exactly once, every file must parse, and the weights must equal those of an uninterrupted run
(training on CPU with one thread is deterministic, and the resume restores every RNG).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustlab.rundir import read_csv
from tests.reliability_support import (
    KILL_AT_REPLACE,
    TINY_TRAIN,
    assert_run_files_parse,
    run_cli,
    run_main,
    run_python,
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
