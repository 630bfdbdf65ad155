"""Schemas of the JSON files robustlab writes and reads back.

A run or results directory is user-editable storage: a file can be damaged by hand, by another tool or
by a hostile user. :func:`robustlab.rundir.read_json` checks each file against its schema here before
any code indexes into it, so a wrong type anywhere is one :class:`~robustlab.errors.CheckpointError`
naming the file and the field (``corrupt RUN/metrics.json: evaluations.linf-0.1: Input should be an
object``), never a ``TypeError`` deep in a report or after an hour of attacks.

The schemas check the fields robustlab reads, strictly (``"0.5"`` is not an accuracy, ``true`` is not
an epoch count), and allow any further keys, so files written by other versions stay readable.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


def _inside(path: str) -> str:
    """A path stored in a run file must stay inside its directory (no absolute path, no ``..``)."""
    parts = PurePosixPath(path.replace("\\", "/"))
    if not path or parts.is_absolute() or ".." in parts.parts:
        raise ValueError(f"must be a relative path inside the directory, got {path!r}")
    return path


RelativePath = Annotated[str, AfterValidator(_inside)]


class _Stored(BaseModel):
    """Strict types for the fields robustlab reads; unknown keys are kept (other versions may add some)."""

    model_config = ConfigDict(extra="allow", strict=True)


Number = float | None


class Cost(_Stored):
    train_seconds: Number = None
    seconds_per_epoch: Number = None
    peak_memory_mb: Number = None
    device: str | None = None
    world_size: int | None = None


class Measured(_Stored):
    """One measurement of an evaluation entry (clean, an attack, or the worst case)."""

    accuracy: float
    ci95: list[Number] | None = None
    attack: dict[str, Any] | None = None
    confidence: dict[str, Any] | None = None


class Samples(_Stored):
    n: int
    file: RelativePath | None = None


class Gap(_Stored):
    clean_minus_worst_case: Number = None
    clean_minus_cw: Number = None
    cw_attack: str | None = None


class Evaluation(_Stored):
    """One ``metrics.json`` ``evaluations[norm-eps]`` entry (see :mod:`robustlab.evaluation`)."""

    threat: dict[str, Any]
    samples: Samples
    clean: Measured
    attacks: dict[str, Measured]
    worst_case: Measured
    gap: Gap
    model: dict[str, Any] | None = None
    cost: Cost | None = None


class Metrics(_Stored):
    """``RUN/metrics.json``: the test accuracy and cost of training, and every evaluation."""

    clean_accuracy: Number = None
    test_size: int | None = None
    cost: Cost | None = None
    selected_epoch: int | None = None
    evaluations: dict[str, Evaluation] = Field(default_factory=dict)


class Metadata(_Stored):
    """``RUN/metadata.json``: status, seed, environment and data description of a run."""

    status: str | None = None
    seed: int | None = None
    defense: str | None = None
    world_size: int | None = None
    data: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    training_shared_with: str | None = None


class CellState(_Stored):
    """``RUN/experiment.json`` of a grid cell: what the grid has done to it."""

    evaluation: dict[str, Any] | None = None
    evaluated_at: Number = None
    audited: bool | None = None
    error: str | None = None


class Sweep(_Stored):
    """Evidence of the audit's ``accuracy_vs_eps`` check (the report plots it)."""

    eps: list[float] = Field(default_factory=list)
    accuracy: list[float] = Field(default_factory=list)
    attack: str | None = None


class AuditCheck(_Stored):
    name: str
    status: str | None = None
    evidence: dict[str, Any] | None = None
    message: str | None = None

    @model_validator(mode="after")
    def _sweep(self) -> AuditCheck:
        if self.name == "accuracy_vs_eps" and self.evidence is not None:
            try:
                Sweep.model_validate(self.evidence)
            except ValidationError as error:
                raise ValueError(f"evidence.{problem(error, limit=1)}") from None
        return self


class Audit(_Stored):
    """``RUN/audit.json``: the gradient-masking checklist."""

    verdict: str | None = None
    checks: list[AuditCheck] = Field(default_factory=list)
    seconds: Number = None


class Rule(_Stored):
    source: str
    match: dict[str, Any]
    set: dict[str, Any]
    cells: list[str] = Field(default_factory=list)


class ExperimentRecord(_Stored):
    """``RESULTS/experiment.json``: the experiment's name, settings, rules and cell ids."""

    name: str | None = None
    description: str | None = None
    profile: str | None = None
    evaluation: dict[str, Any] = Field(default_factory=dict)
    where: list[Rule] = Field(default_factory=list)
    cells: list[str] = Field(default_factory=list)


class ResultRow(_Stored):
    """One cell's row of ``RESULTS/results.json``."""

    cell: str
    dataset: str
    model: str
    defense: str
    eps: float
    norm: str = "linf"
    seed: int | None = None
    status: str
    run_dir: RelativePath
    error: str | None = None
    clean: Number = None
    worst_case: Number = None
    gap_worst_case: Number = None
    gap_cw: Number = None
    train_seconds: Number = None
    seconds_per_epoch: Number = None
    peak_memory_mb: Number = None
    device: str | None = None
    training_shared_with: str | None = None
    audit_verdict: str | None = None
    audit_pending: bool | None = None
    evaluation_seconds: Number = None
    audit_seconds: Number = None
    epochs_done: int | None = None
    epochs: int | None = None
    evaluation: Evaluation | None = None


class Results(_Stored):
    """``RESULTS/results.json``: one row per cell of the grid."""

    experiment: str | None = None
    profile: str | None = None
    rows: list[ResultRow]


def problem(error: ValidationError, limit: int = 3) -> str:
    """The first few problems of a validation error, each as ``field.path: message``, on one line."""
    items = error.errors()
    parts = []
    for item in items[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ").split(" or instance of ")[0]
        parts.append(f"{where}: {message}")
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(parts) + more


__all__ = [
    "Audit",
    "CellState",
    "Evaluation",
    "ExperimentRecord",
    "Metadata",
    "Metrics",
    "Results",
    "problem",
]
