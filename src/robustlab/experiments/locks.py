"""File locks under ``RESULTS_DIR/locks``: several processes (or machines) share one results directory.

Each cell has its own lock, held while it trains, evaluates and audits, so no cell runs twice; the
results table has one too, so concurrent rewrites of ``results.csv`` / ``results.json`` do not interleave.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from robustlab.experiments.plan import Cell
from robustlab.rundir import RunDir


def _lock(results_dir: Path, name: str) -> FileLock:
    (results_dir / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(results_dir / "locks" / f"{name}.lock"))


def _twin_busy(results_dir: Path, cell: Cell) -> bool:
    """Whether another process holds the lock of the twin whose training ``cell`` is waiting for."""
    if cell.twin is None or RunDir(cell.twin.run_dir).is_finished() or RunDir(cell.run_dir).exists():
        return False
    lock = _lock(results_dir, cell.twin.id)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
