"""What a report is made of: results rows, grouped and averaged over seeds, and the paper's claims.

Rows come from ``RESULTS_DIR/results.json`` (written by :mod:`robustlab.experiments`); each row carries
its cell's evaluation entry (``metrics.json`` schema of :mod:`robustlab.evaluation`). Attack columns of
the paper's Table 1 are matched by the *registry name* of the attack that produced a number (``fgsm``,
``pgd``, ``cw_linf``, ``autoattack``), and the attack's own label (``pgd-20``) is carried along so every
measured number names its attack.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from robustlab import schemas
from robustlab.errors import CheckpointError, InputError, RobustlabError
from robustlab.rundir import RunDir, read_csv, read_json

#: Table 1 columns: (key, heading, registry names of the attacks that fill it)
ATTACK_COLUMNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("fgsm", "FGSM", ("fgsm",)),
    ("pgd", "PGD", ("pgd",)),
    ("cw", "CW", ("cw_linf",)),
    ("autoattack", "AutoAttack", ("autoattack",)),
)
#: The defence whose claimed numbers the paper reports and that McNemar compares with every baseline.
HYBRID = "hybrid"
#: The reference of Table 2's ratios ("ratio to standard training").
STANDARD = "standard"


@dataclass
class Results:
    """An experiment's results directory, loaded."""

    path: Path
    experiment: str
    profile: str | None
    rows: list[dict[str, Any]]
    settings: dict[str, Any]


def load_results(results_dir: str | Path, also: Sequence[str | Path] = ()) -> Results:
    """Read ``results.json`` (and ``experiment.json``) of a directory written by ``robustlab experiment``.

    ``also`` adds the cells of further results directories of the same profile, for example the extra
    training seeds of some cells run as a grid of their own: their rows join the first directory's (their
    ``run_dir`` made relative to it), so seeds of one defence average together and pair in McNemar's test.
    A cell present in two directories is refused.
    """
    results = _load_one(Path(results_dir))
    for other_dir in also:
        other = _load_one(Path(other_dir))
        if other.profile != results.profile:
            raise InputError(
                f"{other.path} ran profile {other.profile!r}, {results.path} profile {results.profile!r}: "
                "a report cannot mix profiles"
            )
        known = {row["cell"] for row in results.rows}
        twice = sorted(known & {row["cell"] for row in other.rows})
        if twice:
            raise InputError(f"cell {twice[0]} is in both {results.path} and {other.path}")
        for row in other.rows:
            row["run_dir"] = os.path.relpath(other.path / str(row["run_dir"]), results.path)
        results.rows.extend(other.rows)
        results.experiment += f" + {other.experiment}"
    return results


def _load_one(path: Path) -> Results:
    if not path.is_dir():
        raise CheckpointError(f"results directory not found: {path}")
    summary_path = path / "results.json"
    if not summary_path.exists():
        raise CheckpointError(
            f"{path} has no results.json; run robustlab experiment CONFIG --out {path} first"
        )
    summary = read_json(summary_path, schemas.Results)
    record = path / "experiment.json"
    settings = read_json(record, schemas.ExperimentRecord) if record.exists() else {}
    for row in summary["rows"]:
        if row.get("status") in ("pending", "running"):
            _refresh_progress(path / str(row.get("run_dir")), row)
        if row.get("status") == "finished":
            _read_execution(path / str(row.get("run_dir")), row)
    return Results(
        path, str(summary.get("experiment", path.name)), summary.get("profile"), summary["rows"], settings
    )


def _refresh_progress(run_dir: Path, row: dict[str, Any]) -> None:
    """How far an unfinished cell has got now, read from its run directory.

    ``results.json`` is rewritten only when a cell finishes, so during a long grid it says "pending" for
    a cell that is many epochs into its training, or "running" for one whose training has finished.
    """
    history = run_dir / "history.csv"
    if not history.exists():
        return
    if RunDir(run_dir).is_finished():  # trained since results.json was written: now being evaluated
        row.update(status="evaluating")
        return
    try:
        epochs = row.get("epochs") or RunDir(run_dir).read_config_dict()["train"]["epochs"]
    except (CheckpointError, KeyError, TypeError):
        return
    row.update(status="running", epochs_done=len(read_csv(history)), epochs=epochs)


def _read_execution(run_dir: Path, row: dict[str, Any]) -> None:
    """The execution settings (``channels_last``, device) a finished cell trained with: its ``config.yaml``'s
    (the last a resumed cell ran with).

    They do not change what a cell trains, so a grid keeps cells trained under other settings; their
    wall-clock times then compare different code paths, which Table 2 has to say.
    """
    from robustlab.config import build_config, execution_of

    try:
        row["execution"] = execution_of(build_config(RunDir(run_dir).read_config_dict()))
    except RobustlabError:  # results kept without a readable run directory: nothing to say
        return


def load_claims() -> dict[str, Any]:
    """The paper's Table 1 and Table 2 (``paper_claims.json``, transcribed from the preprint)."""
    text = resources.files("robustlab.report").joinpath("paper_claims.json").read_text(encoding="utf-8")
    return json.loads(text)


def attack_columns(evaluation: dict[str, Any] | None) -> dict[str, tuple[str, float]]:
    """Map Table 1 column keys to (attack label, accuracy) for one evaluation entry.

    When several attacks of one kind were run (e.g. ``pgd-20`` and ``pgd-100``) the column shows the
    strongest (lowest accuracy) and names it.
    """
    found: dict[str, tuple[str, float]] = {}
    for label, measurement in ((evaluation or {}).get("attacks") or {}).items():
        name = (measurement.get("attack") or {}).get("name", label)
        for key, _, names in ATTACK_COLUMNS:
            if name in names and (key not in found or measurement["accuracy"] < found[key][1]):
                found[key] = (label, float(measurement["accuracy"]))
    return found


def group_key(row: dict[str, Any]) -> tuple[str, str, float, str]:
    return (row["dataset"], row["model"], float(row["eps"]), row.get("norm", "linf"))


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float, str], dict[str, list[dict[str, Any]]]]:
    """``{(dataset, model, eps, norm): {defence label: [rows, one per seed]}}`` keeping grid order."""
    groups: dict[tuple[str, str, float, str], dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for row in rows:
        groups[group_key(row)].setdefault(row["defense"], []).append(row)
    return groups


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (std is None for a single seed)."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Stat | None:
        present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not present:
            return None
        mean = sum(present) / len(present)
        if len(present) < 2:
            return cls(mean, None, 1)
        var = sum((v - mean) ** 2 for v in present) / (len(present) - 1)
        return cls(mean, math.sqrt(var), len(present))


def seed_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed-averaged Table 1 and Table 2 quantities of one defence in one group, with attack labels.

    ``strengths`` lists the evaluations' strengths (``autoattack-grade`` / ``upper-bound``, inferred
    from the attacks for entries that predate the field) and ``worst_case_over`` the attacks behind
    the worst case.
    """
    from robustlab.evaluation import strength

    finished = [r for r in rows if r.get("status") == "finished"]
    trained = [r for r in rows if r.get("status") in ("finished", "evaluating")]  # Table 2 needs no evaluation
    per_attack: dict[str, list[float]] = defaultdict(list)
    labels: dict[str, set[str]] = defaultdict(set)
    for row in finished:
        for key, (label, value) in attack_columns(row.get("evaluation")).items():
            per_attack[key].append(value)
            labels[key].add(label)
    out: dict[str, Any] = {
        "seeds": len(finished),
        "clean": Stat.of([r.get("clean") for r in finished]),
        "worst_case": Stat.of([r.get("worst_case") for r in finished]),
        "gap_worst_case": Stat.of([r.get("gap_worst_case") for r in finished]),
        "gap_cw": Stat.of([r.get("gap_cw") for r in finished]),
        "trained": len(trained),
        "train_seconds": Stat.of([r.get("train_seconds") for r in trained]),
        "seconds_per_epoch": Stat.of([r.get("seconds_per_epoch") for r in trained]),
        "peak_memory_mb": Stat.of([r.get("peak_memory_mb") for r in trained]),
        "cost_by_seed": {r.get("seed"): {k: r.get(k) for k in ("train_seconds", "peak_memory_mb")} for r in trained},
        "devices": sorted({str(r.get("device")) for r in trained if r.get("device")}),
        "shared_training": sorted({str(r["training_shared_with"]) for r in trained if r.get("training_shared_with")}),
        "audit": sorted({str(r["audit_verdict"]) for r in finished if r.get("audit_verdict")})
        + (["pending"] if any(r.get("audit_pending") for r in finished) else []),
        "attack_labels": {k: ", ".join(sorted(v)) for k, v in labels.items()},
        "strengths": sorted({strength(r["evaluation"]) for r in finished if r.get("evaluation")}),
        "worst_case_over": list(dict.fromkeys(
            label for r in finished if r.get("evaluation")
            for label in ((r["evaluation"]["worst_case"].get("attack") or {}).get("over") or [])
        )),
        "failed": [r["cell"] for r in rows if r.get("status") == "failed"],
        "statuses": sorted({str(r.get("status")) for r in rows}),
        "progress": [f"{r['epochs_done']}/{r['epochs']} epochs" for r in rows if "epochs_done" in r],
    }
    for key, values in per_attack.items():
        out[key] = Stat.of(values)
    return out


def audit_flagged(defense: str, rows: list[dict[str, Any]]) -> str:
    """``defense``, with the audit's warning or failure when one of its finished cells got one: a figure or
    a comparison must not show masked gradients' robustness without saying so."""
    flags = sorted({str(r["audit_verdict"]) for r in rows
                    if r.get("status") == "finished" and r.get("audit_verdict") in ("fail", "warn")})
    return f"{defense} [audit {'/'.join(flags)}]" if flags else defense


def history(results: Results, row: dict[str, Any]) -> list[dict[str, Any]]:
    """A cell's per-epoch training history (``history.csv``), empty when absent."""
    return read_csv(results.path / row["run_dir"] / "history.csv")


def audit_sweep(results: Results, row: dict[str, Any]) -> tuple[list[float], list[float], str] | None:
    """The accuracy-vs-eps sweep the gradient-masking audit measured for a cell, if it ran."""
    path = results.path / row["run_dir"] / "audit.json"
    if not path.exists():
        return None
    for check in read_json(path, schemas.Audit).get("checks", []):
        evidence = check.get("evidence") or {}
        if check.get("name") == "accuracy_vs_eps" and evidence.get("eps") and evidence.get("accuracy"):
            return (
                list(map(float, evidence["eps"])),
                list(map(float, evidence["accuracy"])),
                str(evidence.get("attack")),
            )
    return None
