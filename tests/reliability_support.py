"""Helpers for the reliability tests: run the CLI in-process or as a real subprocess, check run files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

#: A tiny digits run: 256 train images in batches of 64, 100 validation images (sub-second epochs).
TINY_TRAIN = [
    "train", "--dataset", "digits", "--batch-size", "64", "--epochs", "3", "--no-progress",
    "--set", "data.val_size=100", "--set", "data.train_subset=256", "--set", "data.test_subset=100",
]

#: Kills the process with SIGKILL just before the N-th rename of a run file (the temp file is complete, the
#: target still holds the previous version): ``python -c KILL_AT_REPLACE FILENAME N robustlab-args...``.
KILL_AT_REPLACE = """
import os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == target:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from robustlab.cli import main
main(sys.argv[3:])
"""


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("ROBUSTLAB_DATA", None)
    return env


def run_cli(args: list[str], *, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``robustlab ARGS`` as a real process (the console entry point)."""
    code = "from robustlab.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(), cwd=cwd or ROOT,
    )


def run_python(code: str, args: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(), cwd=ROOT,
    )


def run_main(argv: list[str]) -> int:
    """Run ``robustlab.cli.main(argv)`` in this process and return its exit status."""
    from robustlab.cli import main

    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def main_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``robustlab.cli.main(argv)`` in this process; returns (exit status, stdout, stderr)."""
    code = run_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> str:
    """A user error: non-zero exit, no traceback, exactly one ``error:`` line containing every fragment."""
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_run_files_parse(run_dir: Path) -> None:
    """Every file of a run directory parses (no torn write) and no temp file is left behind."""
    import torch

    from robustlab.rundir import read_csv

    for path in run_dir.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.suffix == ".csv":
            rows = read_csv(path)
            assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1)), rows
        elif path.suffix == ".safetensors":
            assert load_file(path)
        elif path.suffix == ".pt":
            assert isinstance(torch.load(path, weights_only=True), dict)
