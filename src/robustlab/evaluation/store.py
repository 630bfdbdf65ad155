"""An evaluation on disk: merged into ``metrics.json``, per-sample arrays in ``evaluation/<threat key>.npz``."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.errors import CheckpointError, RobustlabError
from robustlab.evaluation.result import EvaluationResult, threat_key
from robustlab.rundir import RunDir, atomic_write_bytes


def save_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, Any]:
    """Save the per-sample arrays, merge ``result`` into ``out_dir/metrics.json``; return that file's data."""
    run = RunDir(out_dir)
    relative = Path("evaluation") / f"{result.key}.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **result.arrays())
    atomic_write_bytes(run.path / relative, buffer.getvalue())
    entry = result.to_dict()
    entry["samples"] = {**entry["samples"], "file": str(relative)}
    evaluations = dict(run.read_metrics().get("evaluations") or {})
    evaluations[result.key] = entry
    return run.update_metrics(evaluations=evaluations)


def refuse_to_replace(out_dir: str | Path, keys: list[str]) -> None:
    """Raise, before any attack runs, if ``out_dir/metrics.json`` already holds an evaluation at any of the
    threats ``keys`` (:func:`threat_key`): nothing computed is replaced unless the caller says so
    (``--overwrite``, ``overwrite=True``)."""
    evaluations = RunDir(out_dir).read_metrics().get("evaluations") or {}
    recorded = [key for key in dict.fromkeys(keys) if evaluations.get(key)]
    if recorded:
        entry = evaluations[recorded[0]]
        n = (entry.get("samples") or {}).get("n")
        what = ", ".join(str(v) for v in (entry.get("strength"), n and f"{n} test images") if v)
        raise RobustlabError(
            f"{out_dir} already holds an evaluation at {', '.join(recorded)}" + (f" ({what})" if what else "")
            + "; pass --overwrite (overwrite=True) to replace it, or leave that budget out"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_evaluation(run_dir: str | Path, eps: float | None = None, norm: str | None = None) -> dict[str, Any]:
    """The ``metrics.json`` entry of one evaluation (default: at the run's own threat)."""
    run = RunDir(run_dir)
    evaluations = run.read_metrics().get("evaluations") or {}
    if eps is None or norm is None:
        threat = (run.read_config_dict().get("threat") or {}) if run.config.exists() else {}
        norm = norm or threat.get("norm", "linf")
        if eps is None:
            from robustlab.config import parse_number

            eps = parse_number(threat.get("eps", 0.3))
    key = threat_key(norm, float(eps))
    if key not in evaluations:
        have = ", ".join(evaluations) or "none"
        raise CheckpointError(f"no evaluation at {key} in {run.metrics} (have: {have}); evaluate first")
    return evaluations[key]


def read_samples(
    run_dir: str | Path, eps: float | None = None, norm: str | None = None
) -> dict[str, np.ndarray]:
    """The per-sample arrays of one evaluation (see the module docstring), loaded without pickle."""
    entry = read_evaluation(run_dir, eps, norm)
    path = Path(run_dir) / entry["samples"]["file"]
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise CheckpointError(f"missing per-sample file: {path}") from None
    except (ValueError, OSError) as error:
        raise CheckpointError(f"corrupt per-sample file {path}: {error}") from None

