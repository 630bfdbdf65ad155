"""Concurrency: two ``robustlab experiment`` processes on one results directory.

Both are real processes started together on the same grid. The per-cell file lock must make every cell
train once and be evaluated once in total (each process logs ``[cell] training`` / ``[cell] evaluating``
when it does that work), both processes must succeed, and every file of the shared results directory
must parse, with one results row per cell.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from robustlab.rundir import read_csv
from tests.reliability_support import (
    ROOT,
    TINY_TRAIN,
    assert_one_error_line,
    assert_run_files_parse,
    main_in_process,
    subprocess_env,
)

SEEDS = [0, 1, 2, 3]
EXPERIMENT = {
    "name": "concurrency",
    "base": {
        "data": {"dataset": "digits", "val_size": 50, "train_subset": 128, "test_subset": 40},
        "model": {"name": "lenet5"},
        "train": {"epochs": 1, "batch_size": 64},
        "threat": {"eps": 0.1},
    },
    "grid": {"defenses": ["standard"], "seeds": SEEDS},
    "evaluation": {"attacks": ["fgsm"], "suite": "quick", "n": 20, "audit": False},
}


def _start(config: Path, results: Path) -> subprocess.Popen:
    code = "from robustlab.cli import main; main()"
    args = ["experiment", str(config), "--out", str(results), "--no-isolate", "--no-report"]
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=subprocess_env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _work_done(logs: list[str], what: str) -> Counter:
    """How many times each cell was trained / evaluated across all processes' logs."""
    counts: Counter = Counter()
    for text in logs:
        for line in text.splitlines():
            line = re.sub(r"^w\d+ \| ", "", line)  # a --workers process's output, relayed by its parent
            if line.startswith("[") and line.rstrip().endswith(f"] {what}") or f"] {what} (resuming)" in line:
                counts[line[1 : line.index("]")]] += 1
    return counts


def _check_results(results: Path) -> list[str]:
    cells = json.loads((results / "experiment.json").read_text())["cells"]
    assert len(cells) == len(SEEDS)
    with (results / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["cell"] for r in rows) == sorted(cells)
    assert all(r["status"] == "finished" for r in rows), rows
    json.loads((results / "results.json").read_text())
    for cell in cells:
        run = results / "runs" / cell
        assert_run_files_parse(run)
        assert len(read_csv(run / "history.csv")) == 1
    return cells


def _run_two(spec: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """Start two experiment processes together on ``spec``; both must succeed. Returns (results, stdouts)."""
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    processes = [_start(config, results) for _ in range(2)]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert "Traceback" not in err
    return results, [out for out, _ in outputs]


def test_two_experiment_processes_share_one_results_dir(tmp_path):
    results, logs = _run_two(EXPERIMENT, tmp_path)
    cells = _check_results(results)
    trained, evaluated = _work_done(logs, "training"), _work_done(logs, "evaluating")
    assert trained == Counter(cells), logs
    assert evaluated == Counter(cells), logs


def test_two_processes_train_eps_twins_once_and_evaluate_each_cell(tmp_path):
    """Standard training ignores eps: of each (seed, eps 0.05 / 0.1) pair only the first cell trains.

    Whichever process reaches the eps-0.1 cell while the other one trains its twin waits for it, so
    across both processes each training runs once and each of the four cells is evaluated once.
    """
    spec = {**EXPERIMENT, "grid": {"defenses": ["standard"], "seeds": [0, 1], "eps": [0.05, 0.1]}}
    results, logs = _run_two(spec, tmp_path)
    first = [f"digits-lenet5-standard-eps0.05-s{seed}" for seed in (0, 1)]
    second = [f"digits-lenet5-standard-eps0.1-s{seed}" for seed in (0, 1)]
    assert _work_done(logs, "training") == Counter(first), logs
    shared = Counter(line[1 : line.index("]")] for text in logs for line in text.splitlines()
                     if "] sharing the training of " in line)
    assert shared == Counter(second), logs
    assert _work_done(logs, "evaluating") == Counter(first + second), logs
    for cell in first + second:
        assert_run_files_parse(results / "runs" / cell)


def test_workers_option_runs_each_cell_once_and_reports_once(tmp_path):
    """``--workers 2`` starts two worker processes on the grid; the parent writes the report at the end."""
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    results = tmp_path / "results"
    code = "from robustlab.cli import main; main()"
    args = ["experiment", str(config), "--out", str(results), "--no-isolate", "--workers", "2"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("worker ") >= 2 and "OMP_NUM_THREADS=" in done.stdout
    cells = _check_results(results)
    assert _work_done([done.stdout], "training") == Counter(cells), done.stdout
    assert _work_done([done.stdout], "evaluating") == Counter(cells), done.stdout
    assert (results / "report.md").exists() and (results / "report.html").exists()
    cell_lines = [line for line in done.stdout.splitlines() if "] training" in line or "] evaluating" in line]
    assert cell_lines and all(re.match(r"w[01] \| \[", line) for line in cell_lines), "a worker's line lacks its prefix"
    progress = [line for line in done.stderr.splitlines() if "evaluate: fgsm done" in line]
    assert progress and all(re.match(r"w[01] \| evaluate", line) for line in progress), done.stderr


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="lists processes through /proc")
def test_sigterm_to_the_parent_stops_every_worker(tmp_path):
    """``kill`` of ``experiment --workers 2`` must not leave its workers running with no one reading them."""
    long = {**EXPERIMENT, "base": {**EXPERIMENT["base"], "train": {"epochs": 5000, "batch_size": 64}}}
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(long))
    results = tmp_path / "results-sigterm"
    log = tmp_path / "parent.log"
    code = "from robustlab.cli import main; main()"
    args = ["experiment", str(config), "--out", str(results), "--no-isolate", "--workers", "2", "--no-report",
            "--no-progress"]  # quiet workers: a closed pipe would not stop them until their next line
    with log.open("w") as out:
        parent = subprocess.Popen([sys.executable, "-c", code, *args], env=subprocess_env(), cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while log.read_text().count("] training") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.read_text().count("] training") == 2, log.read_text()
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=60)

    def workers() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(results) in cmdline:
                found.append(cmdline)
        return found

    deadline = time.monotonic() + 30
    while workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers(), "a worker outlived the killed parent"


def test_no_wait_leaves_a_locked_cell_to_its_owner_and_stops(tmp_path):
    """``--no-wait``: a worker runs the cells it can lock and stops, leaving a cell held elsewhere pending."""
    from filelock import FileLock

    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({**EXPERIMENT, "grid": {"defenses": ["standard"], "seeds": [0, 1]}}))
    results = tmp_path / "results"
    held = "digits-lenet5-standard-eps0.1-s0"
    (results / "locks").mkdir(parents=True)
    code = "from robustlab.cli import main; main()"
    args = ["experiment", str(config), "--out", str(results), "--no-isolate", "--no-report", "--no-wait"]
    with FileLock(str(results / "locks" / f"{held}.lock")):
        done = subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"[{held}] left to the process that holds it" in done.stdout
    assert "1 cell(s) run, 0 already done, 0 failed, 1 left to other processes" in done.stdout
    with (results / "results.csv").open(newline="") as handle:
        statuses = {row["cell"]: row["status"] for row in csv.DictReader(handle)}
    assert statuses == {held: "pending", "digits-lenet5-standard-eps0.1-s1": "finished"}


@pytest.mark.slow
def test_killed_experiment_resumes_without_redoing_finished_cells(tmp_path):
    """SIGKILL one of two concurrent experiment processes mid-grid; a rerun finishes only what is missing."""
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    results = tmp_path / "results"
    victim, survivor = _start(config, results), _start(config, results)
    while victim.poll() is None and not list((results / "runs").glob("*/metrics.json")):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim_out, _ = victim.communicate()
    survivor_out, survivor_err = survivor.communicate(timeout=900)
    assert survivor.returncode == 0, survivor_err  # the killed process's locks were released by the kernel
    rerun = _start(config, results)
    rerun_out, rerun_err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, rerun_err
    cells = _check_results(results)
    assert not _work_done([rerun_out], "training"), rerun_out  # nothing left to train
    assert set(_work_done([victim_out, survivor_out], "training")) == set(cells)


def test_two_trains_on_one_out_do_not_both_train(tmp_path, capsys):
    """Both trained (and overwrote each other's checkpoints); now the second is refused at once, in one line.

    Another process holds the run directory's lock, as a ``robustlab train`` in progress does.
    """
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from robustlab.rundir import RunDir; "
         "lock = RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = main_in_process([*TINY_TRAIN, "--out", str(out)], capsys)
        assert_one_error_line(code, err, str(out), "being trained by another process")
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    code, _, err = main_in_process([*TINY_TRAIN, "--out", str(out)], capsys)  # the kernel freed the lock
    assert code == 0, err
