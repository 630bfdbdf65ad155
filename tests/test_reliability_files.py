"""Untrusted and damaged files, and a full disk.

- Nothing in the library unpickles a user's file: a static scan of the source, and malicious pickles
  (which would create a marker file when unpickled) handed to every loader.
- Each file of a run directory, truncated or corrupted, gives one clear error line (CLI exit 2).
- A full disk (ENOSPC, simulated at the write and at the temp-file creation inside
  ``rundir.atomic_write_bytes``) gives one clear line, a non-zero exit, and leaves earlier results intact;
  the same command rerun once there is space finishes the run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustlab import rundir
from robustlab.errors import CheckpointError, RobustlabError
from robustlab.models import build_model
from robustlab.rundir import load_foreign_checkpoint, load_resume_state, read_csv, write_json
from tests.reliability_support import assert_one_error_line, assert_run_files_parse, main_in_process, run_main

SRC = Path(__file__).resolve().parents[1] / "src" / "robustlab"
TRAIN = ["train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--no-progress",
         "--set", "data.train_subset=128", "--set", "data.val_size=50", "--set", "data.test_subset=40"]
EVALUATE = ["--attacks", "fgsm", "--n", "20", "--no-progress", "--n-boot", "50", "--suite", "quick"]


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files") / "run"
    assert run_main([*TRAIN, "--out", str(path)]) == 0
    return path


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the finished run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _unfinished(run: Path) -> Path:
    """Mark the copy as interrupted after its last epoch, so the train command resumes it."""
    meta = json.loads((run / "metadata.json").read_text())
    meta["status"] = "running"
    (run / "metadata.json").write_text(json.dumps(meta))
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


# --- no pickle of user files -------------------------------------------------------------------
UNSAFE = {
    "pickle module": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b", re.M),
    "joblib.load": re.compile(r"joblib\.load\("),
    "yaml unsafe loaders": re.compile(r"yaml\.(load|unsafe_load|full_load|load_all)\(|Loader=yaml\.(Unsafe)?Loader"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


def test_source_never_unpickles_or_evals():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for what, pattern in UNSAFE.items():
            problems += [f"{path.relative_to(SRC)}: {what}" for _ in pattern.finditer(text)]
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                problems.append(f"{path.relative_to(SRC)}: torch.load without weights_only=True: {call}")
    assert not problems, problems


def test_malicious_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(malicious_pickle(marker))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_foreign_checkpoint(evil, build_model("lenet5", 10, 1, 8))
    with pytest.raises(CheckpointError, match="corrupt resume state"):
        load_resume_state(evil)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError):
        load_foreign_checkpoint(plain, build_model("lenet5", 10, 1, 8))
    assert not marker.exists()


def test_foreign_checkpoint_in_the_cli(tmp_path, capsys, finished_run):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(malicious_pickle(marker))
    args = ["evaluate", "--model", "lenet5", "--dataset", "digits", "--eps", "0.1", *EVALUATE]
    code, _, err = main_in_process([*args, "--checkpoint", str(evil), "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(code, err, "evil.pt", "weights_only=True")
    assert not marker.exists()
    # a genuine .pt state dict (what torch.save(model.state_dict()) writes) is accepted
    good = tmp_path / "good.pt"
    torch.save(load_file(finished_run / "model.safetensors"), good)
    code, _, err = main_in_process([*args, "--checkpoint", str(good), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err


# --- damaged run files -------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": _truncate,
    "garbage": lambda p: p.write_bytes(os.urandom(300)),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize(
    ("name", "command", "message"),
    [
        ("model.safetensors", "evaluate", "model.safetensors"),
        ("config.yaml", "evaluate", "config.yaml"),
        ("metrics.json", "evaluate", "metrics.json"),
        ("resume.pt", "train", "resume.pt"),
        ("config.yaml", "train", "config.yaml"),
    ],
)
def test_damaged_run_file_gives_one_line(run, capsys, name, command, message, damage):
    if command == "train":
        _unfinished(run)
    DAMAGE[damage](run / name)
    before = _snapshot(run)
    argv = [*TRAIN, "--out", str(run)] if command == "train" else ["evaluate", str(run), *EVALUATE]
    code, _, err = main_in_process(argv, capsys)
    assert_one_error_line(code, err, message)
    if name != "metrics.json":
        assert _snapshot(run) == before, "a failed command changed the run directory"


def test_resume_state_that_does_not_fit_the_run(run, capsys):
    _unfinished(run)
    torch.save({"epoch": 1, "optimizer": {}}, run / "resume.pt")
    code, _, err = main_in_process([*TRAIN, "--out", str(run)], capsys)
    assert_one_error_line(code, err, "resume.pt does not fit this run", "--overwrite")


def test_weights_of_another_architecture(run, capsys, tmp_path):
    other = build_model("small_cnn", 10, 1, 8)
    rundir.save_weights(run / "model.safetensors", other)
    code, _, err = main_in_process(["evaluate", str(run), *EVALUATE], capsys)
    assert_one_error_line(code, err, "do not fit the model")
    assert "Missing key(s)" in err or "size mismatch" in err, "the error says what does not fit"


def test_a_pt_state_dict_of_another_architecture_says_what_does_not_fit(capsys, tmp_path):
    pt = tmp_path / "other.pt"
    torch.save(build_model("small_cnn", 10, 1, 8).net.state_dict(), pt)
    code, _, err = main_in_process(["evaluate", "--checkpoint", str(pt), "--model", "lenet5", "--dataset", "digits",
                                    "--eps", "0.1", "--out", str(tmp_path / "eval"), *EVALUATE], capsys)
    assert_one_error_line(code, err, "do not fit the model")
    assert "Missing key(s)" in err or "size mismatch" in err, "the error says what does not fit"


def test_truncated_history_is_detected_on_resume(run, capsys):
    _unfinished(run)
    (run / "history.csv").write_text("epoch,train_loss\n1,2.3\n")  # epoch 2's row is lost
    code, _, err = main_in_process([*TRAIN, "--out", str(run)], capsys)
    assert_one_error_line(code, err, "history.csv")


# --- disk full ---------------------------------------------------------------------------------
class FullDisk:
    """Replaces ``os.fdopen`` in rundir: every write after the first ``allow`` ones fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, allow: int = 0) -> None:
        self.allow, self.real = allow, os.fdopen
        monkeypatch.setattr(rundir.os, "fdopen", self)

    def __call__(self, fd, *args, **kwargs):
        handle = self.real(fd, *args, **kwargs)
        if self.allow > 0:
            self.allow -= 1
            return handle

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"clean_accuracy": 0.9})
    FullDisk(monkeypatch)
    with pytest.raises(RobustlabError, match="No space left on device"):
        write_json(target, {"clean_accuracy": 0.1})
    assert json.loads(target.read_text()) == {"clean_accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """Results in a shared folder must be readable by its other users, as open(path, "w") would make them."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_json(tmp_path / "metrics.json", {"clean_accuracy": 0.9})
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_temp_file_creation_on_a_full_disk(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    with pytest.raises(RobustlabError, match="could not write .*No space left on device"):
        write_json(tmp_path / "x.json", {})


def test_evaluate_on_a_full_disk_keeps_earlier_results(run, capsys, monkeypatch):
    before = _snapshot(run)
    FullDisk(monkeypatch)
    code, _, err = main_in_process(["evaluate", str(run), *EVALUATE], capsys)
    assert_one_error_line(code, err, "No space left on device")
    assert _snapshot(run) == before


def test_train_on_a_full_disk_then_resume(tmp_path, capsys, monkeypatch):
    """The disk fills up during epoch 2's checkpoint; once space is back, the same command finishes the run."""
    out = tmp_path / "run"
    disk = FullDisk(monkeypatch, allow=6)  # config, metadata, model, last, history, resume of epoch 1
    code, _, err = main_in_process([*TRAIN, "--out", str(out)], capsys)
    assert_one_error_line(code, err, "No space left on device")
    assert_run_files_parse(out)
    assert len(read_csv(out / "history.csv")) == 1
    disk.allow = 10**6
    code, _, err = main_in_process([*TRAIN, "--out", str(out)], capsys)
    assert code == 0, err
    assert_run_files_parse(out)
    assert len(read_csv(out / "history.csv")) == 2


# --- hostile JSON in a run directory -----------------------------------------------------------
DEEP = "[" * 100_000
HOSTILE_JSON = [
    ("metadata.json", "[]", "evaluate", "(top level): Input should be a valid dictionary"),
    ("metadata.json", "[]", "train", "(top level): Input should be a valid dictionary"),
    ("metadata.json", DEEP, "evaluate", "nested deeper than 64 levels"),
    ("metadata.json", DEEP, "train", "nested deeper than 64 levels"),
    ("metadata.json", '{"status": ["finished"]}', "train", "status: Input should be a valid string"),
    ("metrics.json", "[]", "evaluate", "(top level): Input should be a valid dictionary"),
    ("metrics.json", '{"evaluations": "zzz"}', "evaluate", "evaluations: Input should be a valid dictionary"),
    ("metrics.json", '{"evaluations": {"linf-0.1": "x"}}', "evaluate", "evaluations.linf-0.1: Input should be"),
    ("metrics.json", '{"cost": {"train_seconds": "1"}}', "evaluate", "cost.train_seconds: Input should be"),
]


@pytest.mark.parametrize(("name", "content", "command", "message"), HOSTILE_JSON,
                         ids=[f"{n}-{c[:12]}-{cmd}" for n, c, cmd, _ in HOSTILE_JSON])
def test_hostile_json_in_a_run_directory_is_one_line_before_any_work(run, capsys, monkeypatch, name, content,
                                                                      command, message):
    """Each was a traceback (metrics.json ones *after* every attack had run, losing the work); now one line
    naming the file and the field, before anything is attacked or trained."""
    from robustlab import evaluation, training

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the damaged file was noticed")

    monkeypatch.setattr(evaluation, "evaluate_model", refuse)
    monkeypatch.setattr(training.Trainer, "_fit", refuse)
    (run / name).write_text(content)
    before = _snapshot(run)
    argv = [*TRAIN, "--out", str(run)] if command == "train" else ["evaluate", str(run), *EVALUATE]
    code, _, err = main_in_process(argv, capsys)
    assert_one_error_line(code, err, str(run / name), message)
    assert _snapshot(run) == before


def test_nan_weights_are_named(run, capsys):
    """Before: ``error: confidence must hold per-sample correctness in [0, 1]`` (after a warning)."""
    from safetensors.torch import save_file

    weights = load_file(run / "model.safetensors")
    key = next(k for k, v in weights.items() if v.is_floating_point() and k.endswith("weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, run / "model.safetensors")
    code, _, err = main_in_process(["evaluate", str(run), *EVALUATE], capsys)
    line = assert_one_error_line(code, err, "model.safetensors", "NaN or infinite values", key)
    assert err.strip() == line, err  # no warning before it


def test_refused_unpickling_prints_no_torch_warnings(tmp_path):
    """A plain pickle (protocol 4) as a checkpoint: torch's two UserWarning lines came before the error line.

    A real process: pytest would record the warnings instead of letting them reach stderr.
    """
    from tests.reliability_support import run_cli

    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    args = ["evaluate", "--model", "lenet5", "--dataset", "digits", "--eps", "0.1", *EVALUATE]
    done = run_cli([*args, "--checkpoint", str(plain), "--out", str(tmp_path / "o")], timeout=300)
    code, err = done.returncode, done.stderr
    line = assert_one_error_line(code, err, "plain.pt", "refused")
    assert err.strip() == line, err
    assert not marker.exists()
