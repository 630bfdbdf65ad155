"""Results: one row per cell (status, accuracies, cost, audit), written as ``results.csv`` and ``results.json``.

Rows are read back from every cell's run directory, so the table can be rewritten at any time (after
every cell of a running grid, or by another process sharing the results directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustlab import schemas
from robustlab.errors import RobustlabError
from robustlab.experiments.locks import _lock
from robustlab.experiments.plan import Cell, ExperimentPlan, _read_state
from robustlab.rundir import RunDir, read_csv, read_json, write_csv, write_json


def _evaluation_entry(cell: Cell) -> dict[str, Any] | None:
    """The cell's evaluation at its own threat (``metrics.json`` ``evaluations[norm-eps]``), if measured."""
    from robustlab.evaluation import read_evaluation

    try:
        return read_evaluation(cell.run_dir, cell.config.threat.eps, cell.config.threat.norm)
    except RobustlabError:
        return None


def _status(run: RunDir, state: dict[str, Any]) -> str:
    """pending / running (training) / evaluating (trained, the grid's evaluation not yet recorded) / finished."""
    if not run.exists():
        return "pending"
    if not run.is_finished():
        return "running"
    return "finished" if "evaluation" in state else "evaluating"


def cell_row(cell: Cell, audit: bool = False) -> dict[str, Any]:
    """One results row: axes, status, clean / per-attack / worst-case accuracy, gaps, cost, audit verdict.

    ``audit``: the grid audits its cells, so a cell without ``audit.json`` yet is marked ``audit_pending``.

    Robust columns are named ``acc:<attack label>`` (e.g. ``acc:pgd-20``) so a number always names the
    attack that produced it. The full evaluation entry stays in ``results.json`` under ``evaluation``.
    """
    from robustlab.evaluation import strength

    run = RunDir(cell.run_dir)
    row: dict[str, Any] = {"cell": cell.id, **cell.axes, "run_dir": str(Path("runs") / cell.id)}
    state = _read_state(cell)
    if state.get("error"):
        row.update(status="failed", error=state["error"])
    else:
        row["status"] = _status(run, state)
    if row["status"] == "running":  # started, not finished: how far training got (a grid takes hours)
        row["epochs_done"] = len(read_csv(run.history)) if run.history.exists() else 0
        row["epochs"] = cell.config.train.epochs
    metrics = run.read_metrics()
    entry = _evaluation_entry(cell)
    if entry is not None:
        row["test_n"] = entry["samples"]["n"]
        row["test_of"] = entry["samples"].get("of")
        row["test_subset"] = entry["samples"].get("subset")
        clean_all = entry.get("clean_all")  # the attacks saw a subset; clean accuracy covers every test image
        row["clean"] = clean_all["accuracy"] if clean_all else entry["clean"]["accuracy"]
        row["clean_n"] = clean_all["n"] if clean_all else entry["samples"]["n"]
        if clean_all:
            row["clean_attacked"] = entry["clean"]["accuracy"]
        for label, measurement in entry["attacks"].items():
            row[f"acc:{label}"] = measurement["accuracy"]
        row["worst_case"] = entry["worst_case"]["accuracy"]
        row["strength"] = strength(entry)
        row["gap_worst_case"] = entry["gap"]["clean_minus_worst_case"]
        row["gap_cw"] = entry["gap"]["clean_minus_cw"]
    elif "clean_accuracy" in metrics:
        row["clean"] = metrics["clean_accuracy"]
    cost = metrics.get("cost") or {}
    for key in ("train_seconds", "seconds_per_epoch", "peak_memory_mb", "device"):
        row[key] = cost.get(key)
    row["selected_epoch"] = metrics.get("selected_epoch")
    if run.is_finished():
        row["training_shared_with"] = run.read_metadata().get("training_shared_with")
    audit_path = cell.run_dir / "audit.json"
    if audit_path.exists():
        verdict = read_json(audit_path, schemas.Audit)
        row["audit_verdict"] = verdict.get("verdict")
        row["audit_seconds"] = verdict.get("seconds")
    elif audit and row["status"] != "failed":
        row["audit_pending"] = True
    row["evaluation_seconds"] = (entry or {}).get("seconds")
    row["evaluation"] = entry
    return row


def collect_results(plan: ExperimentPlan, failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rewrite ``results.csv`` and ``results.json`` from every cell's run directory (under a lock).

    ``failed`` adds this invocation's failures of cells that never got a run directory.
    """
    rows = [cell_row(cell, audit=plan.evaluation.audit) for cell in plan.cells]
    for row in rows:
        if failed and row["cell"] in failed and row["status"] != "failed":
            row.update(status="failed", error=failed[row["cell"]])
    with _lock(plan.results_dir, "results"):
        summary = {"experiment": plan.config.name, "profile": plan.profile, "rows": rows}
        write_json(plan.results_dir / "results.json", summary)
        flat = [{k: v for k, v in row.items() if k != "evaluation"} for row in rows]
        write_csv(plan.results_dir / "results.csv", flat)
    return rows
