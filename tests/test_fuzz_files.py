"""Property-based tests of the files robustlab reads: ``npz:`` datasets and run-directory JSON.

For any content (dtypes, shapes, label values, NaN, empty splits; JSON of any type and nesting depth)
the real command (``robustlab.cli.main``, in-process) must end in exactly one of two ways: exit status 2
with one ``error:`` line and no traceback, or a correct run. Never a traceback, never a hang: each
example runs under an alarm (``EXAMPLE_SECONDS``). Examples are few and tiny so the default suite stays fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability_support import run_main

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
#: A tiny example takes well under a second; one that takes this long is a hang.
EXAMPLE_SECONDS = 60


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def hang(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process under the time limit; (exit status, stderr)."""
    err = io.StringIO()
    with time_limit(EXAMPLE_SECONDS), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_main(argv)
    return code, err.getvalue()


def assert_error_or_success(code: int, err: str) -> bool:
    """Exit 2 with one ``error:`` line, or exit 0; returns whether it succeeded."""
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    return code == 0


# --- npz datasets ------------------------------------------------------------------------------
LABELS = [0, 1, 2, 0, 1, 2, 3, -1, 2**40]


@st.composite
def npz_contents(draw: st.DrawFn) -> dict[str, Any]:
    size = draw(st.sampled_from([8, 8, 8, 1, 3, 9]))
    layout = draw(st.sampled_from([(), (), (1,), (3,)]))
    pixels = draw(st.sampled_from([np.uint8, np.uint8, np.uint8, np.float32, np.int64]))
    arrays: dict[str, Any] = {}
    for split, most in (("train", 14), ("test", 6)):
        n = draw(st.integers(0, most))
        side = size if draw(st.booleans()) or split == "train" else draw(st.sampled_from([size, 5]))
        shape = (n, side, side, *(layout if draw(st.integers(0, 4)) else draw(st.sampled_from([(), (3,)]))))
        arrays[f"x_{split}"] = np.random.default_rng(n).integers(0, 256, shape).astype(pixels)
        values = draw(st.lists(st.sampled_from(LABELS[:3] if draw(st.integers(0, 2)) else LABELS),
                               min_size=n, max_size=n + draw(st.sampled_from([0, 0, 0, 1]))))
        kind = draw(st.sampled_from(["int64", "int64", "int32", "uint8x", "float64", "nan", "bool", "str", "2d"]))
        labels = np.asarray(values, dtype=np.int64)
        if kind == "int32":
            labels = labels.astype(np.int32) if not len(labels) or labels.max() < 2**31 else labels
        elif kind == "uint8x":
            labels = np.abs(labels).clip(0, 255).astype(np.uint8)
        elif kind in ("float64", "nan"):
            labels = labels.astype(np.float64)
            if kind == "nan" and len(labels):
                labels[0] = np.nan
        elif kind == "bool":
            labels = labels.astype(bool)
        elif kind == "str":
            labels = labels.astype(str)
        elif kind == "2d":
            labels = labels[:, None]
        arrays[f"y_{split}"] = labels
    if draw(st.integers(0, 9)) == 0:
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    return arrays


@FUZZ
@given(arrays=npz_contents())
def test_any_npz_dataset_is_one_error_line_or_a_correct_run(arrays):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.npz"
        np.savez(path, **arrays)
        out = Path(folder) / "run"
        argv = ["train", "--dataset", f"npz:{path}", "--epochs", "1", "--batch-size", "4", "--no-progress",
                "--set", "data.val_size=2", "--set", "train.val_robust_size=2", "--out", str(out)]
        code, err = cli(argv)
        if assert_error_or_success(code, err):
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["test_size"] == len(arrays["y_test"]) and 0 <= metrics["clean_accuracy"] <= 1
            assert json.loads((out / "metadata.json").read_text())["status"] == "finished"
            labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
            assert labels.dtype.kind in "iu" and labels.min() >= 0
        else:
            assert not out.exists(), "a dataset that cannot train left a run directory"


# --- run-directory JSON ------------------------------------------------------------------------
KEYS = ["status", "seed", "training_shared_with", "evaluations", "linf-0.3", "cost", "train_seconds",
        "clean_accuracy", "test_size", "selected_epoch", "samples", "n", "file", "clean", "accuracy", "attacks",
        "worst_case", "gap", "threat", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True),
                    st.sampled_from(["finished", "running", "", "../../etc/passwd", "0.5"]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)
deep = st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth)
documents = st.one_of(json_values.map(json.dumps), deep, st.text(max_size=20))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--no-progress",
            "--set", "data.train_subset=64", "--set", "data.val_size=20", "--set", "data.test_subset=20"]
    assert run_main([*argv, "--out", str(out)]) == 0
    return out


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(["metadata.json", "metrics.json"]), text=documents)
def test_any_run_json_is_one_error_line_or_a_correct_evaluation(finished_run, name, text):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        shutil.copytree(finished_run, run)
        (run / name).write_text(text)
        code, err = cli(["evaluate", str(run), "--attacks", "fgsm", "--n", "10", "--n-boot", "20", "--no-progress"])
        if assert_error_or_success(code, err):
            from robustlab import schemas  # the file as written must validate against its own schema
            from robustlab.rundir import read_json

            metrics = read_json(run / "metrics.json", schemas.Metrics)
            assert metrics["evaluations"]["linf-0.3"]["samples"]["n"] == 10
        else:
            assert name in err and (run / name).read_text() == text
