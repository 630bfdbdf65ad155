"""Running: train (in a child process by default), evaluate and audit every unfinished cell, resumably.

A finished cell is skipped, an unfinished one resumes; cells locked by another process are left to it
and waited for at the end. A cell whose training ignores eps copies the training of its twin instead of
training again. The results table is written at the start and rewritten after every cell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout
from safetensors.torch import load_file

from robustlab.config import LOCATION_SETTINGS, RunConfig, build_config, config_to_dict
from robustlab.data import DatasetSplits
from robustlab.errors import ConfigError, RobustlabError
from robustlab.experiments.collect import collect_results
from robustlab.experiments.config import (
    EvaluationSettings,
    ExperimentConfig,
    _audit_function,
    _evaluation_kwargs,
    _signature,
    load_experiment,
)
from robustlab.experiments.locks import _lock, _twin_busy
from robustlab.experiments.plan import Cell, ExperimentPlan, _read_state, plan_experiment, select_cells
from robustlab.rundir import DIR_MODE, RunDir, save_resume_state, write_json
from robustlab.runs import prepare_data
from robustlab.training_state import trains_the_same


class _Refused(RobustlabError):
    """A cell's finished run does not fit the grid asked for: the request is wrong, not the cell, so the
    error is reported for this invocation and not written into the cell's state."""


@dataclass
class ExperimentResult:
    results_dir: Path
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)  # locked by another process, not waited for
    seconds: float = 0.0


def _data_key(config: RunConfig) -> str:
    return json.dumps(config.data.model_dump(mode="json"), sort_keys=True)


def load_cell_data(cells: list[Cell]) -> dict[str, DatasetSplits]:
    """Load every distinct dataset of the grid once (so missing data fails before any training)."""
    loaded: dict[str, DatasetSplits] = {}
    for cell in cells:
        key = _data_key(cell.config)
        if key not in loaded:
            try:
                loaded[key] = prepare_data(cell.config)
            except RobustlabError as error:
                name = cell.config.data.dataset
                raise ConfigError(f"data.dataset '{name}' (cell {cell.id}): {error}") from None
    return loaded


def _config_matches(cell: Cell) -> bool:
    return trains_the_same(cell.run_dir, cell.config)


def _exit_with_parent(parent: int) -> None:
    """Stop this process when ``parent`` dies, so a killed experiment leaves no orphan training behind."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def train_child_main() -> None:
    """Entry point of an isolated training process: a JSON job on stdin, a user error to ``error_file``."""
    from robustlab.training import train

    job = json.loads(sys.stdin.read())
    threading.Thread(target=_exit_with_parent, args=(job["parent"],), daemon=True).start()
    try:
        train(job["config"], job["run_dir"], progress=job["progress"])
    except RobustlabError as error:
        Path(job["error_file"]).write_text(str(error), encoding="utf-8")
        sys.exit(2)


def _train(cell: Cell, data: DatasetSplits | None, progress: bool, isolate: bool) -> None:
    """Train one cell, by default in a fresh Python process.

    Isolation makes Table 2 honest on CPU: peak memory there is the process's peak resident set size,
    which only ever grows, so cells trained one after another in one process would inherit the peak
    of every earlier cell. The child is a plain ``python -c`` process (not multiprocessing's spawn,
    which would re-run an unguarded user script); a user error in it is re-raised here unchanged.
    """
    if not isolate:
        from robustlab.training import train

        train(cell.config, cell.run_dir, progress=progress, data=data)
        return
    with tempfile.TemporaryDirectory(prefix="robustlab-cell-") as scratch:
        error_file = Path(scratch) / "error.txt"
        job = {"config": config_to_dict(cell.config), "run_dir": str(cell.run_dir), "progress": progress,
               "parent": os.getpid(), "error_file": str(error_file)}
        code = "from robustlab.experiments.run import train_child_main; train_child_main()"
        done = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), text=True, check=False)
        if done.returncode != 0:
            if error_file.exists():
                raise RobustlabError(error_file.read_text(encoding="utf-8"))
            raise RobustlabError(
                f"training process of cell {cell.id} exited with status {done.returncode} (its traceback is above)"
            )


def run_cell(
    cell: Cell,
    settings: EvaluationSettings,
    data: DatasetSplits | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
    isolate: bool = True,
    reevaluate_before: float | None = None,
    evaluated: Callable[[], None] | None = None,
) -> bool:
    """Train (or resume), evaluate and audit one cell; returns False when everything was already done.

    ``reevaluate_before`` (a Unix time): evaluate the cell again if its evaluation was made before then,
    for example before a fix to an attack; its training and audit are kept. ``evaluated`` is called once
    the evaluation is recorded, before the audit (the grid updates its results table there: an audit
    takes long, and the numbers are there to report with the audit marked pending).
    """
    from robustlab.evaluation import evaluate_run
    from robustlab.training import restore_selected_weights

    run = RunDir(cell.run_dir)
    trained = False
    if run.is_finished():
        if not _config_matches(cell):
            raise _Refused(
                f"cell {cell.id}: {cell.run_dir} holds a finished run with a different config; "
                "use another --out (or delete that run directory)"
            )
    elif _twin_trained(cell):
        log(f"[{cell.id}] sharing the training of {cell.twin.id} (it does not depend on eps)")
        _share_training(cell.twin, cell)
        trained = True
    else:
        log(f"[{cell.id}] training{' (resuming)' if run.exists() else ''}")
        _train(cell, data, progress, isolate)
        trained = True
    if restore_selected_weights(cell.run_dir):
        log(f"[{cell.id}] model.safetensors restored from resume.pt (trained on another machine)")
    state = _read_state(cell)
    if state.pop("error", None) is not None:  # an earlier failure of this cell is resolved once it trains
        write_json(cell.state_path, state)
    kwargs = _evaluation_kwargs(settings, cell.config.train.device)
    signature = _signature(kwargs)
    evaluate = trained or not _evaluation_current(state, signature, reevaluate_before)
    audit = _audit_function() if settings.audit else None
    audit_now = audit is not None and (trained or not state.get("audited"))  # the audit depends on the weights only
    if evaluate or audit_now:
        if not run.weights.exists():
            raise RobustlabError(
                f"cell {cell.id}: its run is trained but its weights are gone (no model.safetensors, no "
                f"resume.pt), and its evaluation or audit is not done; delete {cell.run_dir} to train it again"
            )
        _read_data_from_here(cell)
    if evaluate:
        replaced = not trained and "evaluation" in state
        log(f"[{cell.id}] evaluating" + (" again (the grid's evaluation settings changed, or --reevaluate-before): "
                                        "its recorded evaluation is replaced" if replaced else ""))
        evaluate_run(cell.run_dir, **kwargs, progress=progress, overwrite=True)
        state.update(evaluation=signature, evaluated_at=time.time())
        write_json(cell.state_path, state)
        if evaluated is not None and audit_now:
            evaluated()
    if audit_now:
        log(f"[{cell.id}] auditing")
        audit(cell.run_dir, **settings.audit_options, progress=progress, overwrite=True)
        state.update(audited=True)
        write_json(cell.state_path, state)
    if run.resume.exists():  # done: its resume state (weights included) must not stay in a committed results dir
        run.resume.unlink()
    return trained or evaluate or audit_now


def _evaluation_current(state: dict[str, Any], signature: Any, reevaluate_before: float | None) -> bool:
    """Whether the cell's recorded evaluation used these settings (and was made after ``reevaluate_before``)."""
    if state.get("evaluation") != signature:
        return False
    return reevaluate_before is None or float(state.get("evaluated_at") or 0.0) >= reevaluate_before


def _read_data_from_here(cell: Cell) -> None:
    """Point the cell's ``config.yaml`` at this grid's data folder (:data:`~robustlab.config.LOCATION_SETTINGS`).

    A cell trained on another machine names that machine's folder; its evaluation and audit load the data
    the run's config names, so they would look for it there.
    """
    run = RunDir(cell.run_dir)
    stored, here = run.read_config_dict(), config_to_dict(cell.config)
    moved = [(section, key) for section, key in LOCATION_SETTINGS
             if stored.get(section, {}).get(key) != here[section][key]]
    for section, key in moved:
        stored[section][key] = here[section][key]
    if moved:
        run.write_config(stored)


def _twin_trained(cell: Cell) -> bool:
    twin = cell.twin
    return (
        twin is not None
        and not RunDir(cell.run_dir).exists()
        and RunDir(twin.run_dir).is_finished()
        and RunDir(twin.run_dir).weights.exists()  # results kept without weights (benchmarks/paper-*)
        and _config_matches(twin)
    )


def _share_training(source: Cell, cell: Cell) -> None:
    """Make ``cell`` a finished run holding ``source``'s training, evaluated later at its own eps.

    Weights, history and resume state are copied; ``config.yaml`` is the cell's own; ``metrics.json``
    keeps the training cost and clean accuracy but none of ``source``'s evaluations; ``metadata.json``
    names the source (``training_shared_with``). When ``source`` has already dropped its ``resume.pt``
    (it is done), the cell gets one holding only the selected weights: until the cell itself is done,
    that file is what carries its weights to a fresh clone of a results directory committed without
    ``.safetensors``. Everything is written into a hidden sibling that is
    renamed into place, so an interruption leaves either no run directory or a complete one.
    """
    origin = RunDir(source.run_dir)
    cell.run_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{cell.id}-", dir=cell.run_dir.parent))
    try:
        scratch.chmod(DIR_MODE)  # a shared results folder's other users must see the cell
        run = RunDir(scratch)
        for path in (origin.history, origin.weights, origin.last_weights, origin.resume):
            if path.exists():
                shutil.copy2(path, scratch / path.name)
        if not origin.resume.exists():  # the twin is done and dropped it: the weights must still travel
            save_resume_state(run.resume, {"selected": load_file(origin.weights)})
        run.write_config(config_to_dict(cell.config))
        write_json(run.metrics, {k: v for k, v in origin.read_metrics().items() if k != "evaluations"})
        write_json(run.metadata, {**origin.read_metadata(), "training_shared_with": source.id})
        scratch.rename(cell.run_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def run_experiment(
    config: ExperimentConfig | str | Path,
    results_dir: str | Path,
    *,
    profile: str | None = None,
    data_dir: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    wait_for_locked: bool = True,
    isolate: bool = True,
    only: list[str] | None = None,
    reevaluate_before: float | None = None,
) -> ExperimentResult:
    """Validate the whole grid, then train / evaluate / audit every unfinished cell and write results.

    Cells locked by another process are skipped on the first pass and (``wait_for_locked``) waited for
    afterwards, so the results table written at the end covers the whole grid; without waiting they are
    listed in ``ExperimentResult.left`` (a worker that should stop when its own share is done). A cell
    that fails with a user error is recorded (``status = failed``) and the others still run; ``ExperimentResult.failed``
    lists them. ``isolate`` trains each cell in a fresh process (honest per-cell peak memory on CPU);
    ``isolate=False`` trains in this process, reusing the loaded data (faster for tiny grids).
    ``only`` (:func:`parse_cell_filter`) runs part of the grid; the results table still lists every cell.
    ``reevaluate_before`` (a Unix time) evaluates again every selected cell whose evaluation was made before
    then (after a fix to an attack, say), keeping its training and audit; a rerun of the same command skips
    the cells it has already evaluated again.
    """
    started = time.perf_counter()
    if not isinstance(config, ExperimentConfig):
        config = load_experiment(config)
    plan = plan_experiment(config, results_dir, profile=profile, data_dir=data_dir, overrides=overrides)
    selected = select_cells(plan, only)
    _refuse_changed_cells(selected)
    pending = [c for c in selected if not _cell_done(c, plan.evaluation, reevaluate_before)]
    data = load_cell_data(pending)
    plan.results_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        plan.results_dir / "experiment.json",
        {
            "name": config.name,
            "description": config.description,
            "profile": profile,
            "evaluation": plan.evaluation.model_dump(mode="json"),
            "where": plan.rules,
            "cells": [c.id for c in plan.cells],
        },
    )
    collect_results(plan)  # a results table from the start: the grid can be reported before any cell is done
    result = ExperimentResult(plan.results_dir, [])
    deferred: list[Cell] = []
    for index, cell in enumerate(selected, 1):
        log(f"cell {index}/{len(selected)}: {cell.id}")
        if _twin_busy(plan.results_dir, cell):
            log(f"[{cell.id}] waits for {cell.twin.id}, whose training it shares; coming back to it later")
            deferred.append(cell)
            continue
        lock = _lock(plan.results_dir, cell.id)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"[{cell.id}] locked by another process; coming back to it later")
            deferred.append(cell)
            continue
        try:
            _run_locked(cell, plan, data, result, progress, log, isolate, reevaluate_before)
        finally:
            lock.release()
        collect_results(plan, result.failed)  # keep results current: a partly done grid can be reported
    for cell in deferred:
        if not wait_for_locked:
            log(f"[{cell.id}] left to the process that holds it (not waiting)")
            result.left.append(cell.id)
            continue
        if cell.twin is not None:
            with _lock(plan.results_dir, cell.twin.id):  # its owner has finished it (or failed)
                pass
        with _lock(plan.results_dir, cell.id):
            _run_locked(cell, plan, data, result, progress, log, isolate, reevaluate_before)
    result.rows = collect_results(plan, result.failed)
    result.seconds = time.perf_counter() - started
    return result


def worker_environments(workers: int, gpus: int | None = None, cpus: int | None = None) -> list[dict[str, str]]:
    """Environment overrides for ``workers`` processes that share one grid through the per-cell locks.

    Each worker gets ``cpus // workers`` CPU threads (``OMP_NUM_THREADS``), so the workers do not
    oversubscribe the cores. When CUDA devices are visible, worker ``i`` is pinned to device
    ``i mod count`` (``CUDA_VISIBLE_DEVICES``, respecting an existing restriction): one cell per GPU at
    a time, which is how a many-cell grid uses a multi-GPU machine.
    """
    import torch

    gpus = torch.cuda.device_count() if gpus is None else gpus
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    threads = str(max(1, cpus // workers))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d] if visible else [str(i) for i in range(gpus)]
    devices = devices[:gpus] if gpus else []
    return [
        {"OMP_NUM_THREADS": threads, **({"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {})}
        for i in range(workers)
    ]


def _refuse_changed_cells(cells: list[Cell]) -> None:
    """Raise, before anything runs or is written, if a cell's directory holds a finished run that another
    config trained: its results stay as they are, and so does the grid's results table."""
    changed = [c for c in cells if RunDir(c.run_dir).is_finished() and not _config_matches(c)]
    if changed:
        try:
            build_config(RunDir(changed[0].run_dir).read_config_dict())
            why = "trained with another config"
        except RobustlabError as error:
            why = f"whose config.yaml cannot be read ({error})"
        raise RobustlabError(
            f"{len(changed)} cell(s) of this grid hold finished runs {why} (first: {changed[0].run_dir}); "
            "a changed grid needs another --out (or delete those run directories)"
        )


def _cell_done(cell: Cell, settings: EvaluationSettings, reevaluate_before: float | None = None) -> bool:
    state = _read_state(cell)  # read first: a damaged file stops the grid before any work, not midway
    if not RunDir(cell.run_dir).is_finished():
        return False
    signature = _signature(_evaluation_kwargs(settings, cell.config.train.device))
    audited = state.get("audited") or not settings.audit or _audit_function() is None
    return _evaluation_current(state, signature, reevaluate_before) and bool(audited)


def _run_locked(
    cell: Cell,
    plan: ExperimentPlan,
    data: dict[str, DatasetSplits],
    result: ExperimentResult,
    progress: bool,
    log: Callable[[str], None],
    isolate: bool,
    reevaluate_before: float | None,
) -> None:
    try:
        did = run_cell(
            cell,
            plan.evaluation,
            data.get(_data_key(cell.config)),
            progress=progress,
            log=log,
            isolate=isolate,
            reevaluate_before=reevaluate_before,
            evaluated=lambda: collect_results(plan, result.failed),
        )
    except RobustlabError as error:
        log(f"[{cell.id}] failed: {error}")
        result.failed[cell.id] = str(error)
        if cell.run_dir.exists() and not isinstance(error, _Refused):
            write_json(cell.state_path, {**_read_state(cell), "error": str(error)})
        return
    (result.ran if did else result.skipped).append(cell.id)
    if not did:
        log(f"[{cell.id}] already finished; skipped")
