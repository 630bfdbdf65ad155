"""Planning: the grid expanded into cells, each with a validated run config (no training, no data).

:func:`plan_experiment` applies the profile, overrides and ``where`` rules and checks every axis value,
every cell's config and the evaluation settings, so a mistake anywhere in the grid is reported before any
training starts. :func:`select_cells` picks the part of the grid that ``--only`` names.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab import schemas
from robustlab.config import RunConfig, build_config, config_to_dict, deep_merge, parse_number
from robustlab.errors import ConfigError, RobustlabError
from robustlab.experiments.config import (
    CellRule,
    EvaluationSettings,
    ExperimentConfig,
    GridAxes,
    _apply_profile,
    _check_rule,
    _rule_matches,
    check_evaluation,
)
from robustlab.rundir import read_json


@dataclass
class Cell:
    """One point of the grid: its id, the validated run config and where it lives."""

    id: str
    config: RunConfig
    run_dir: Path
    axes: dict[str, Any]
    #: an earlier cell whose training is this cell's too (they differ only in an eps training ignores)
    twin: Cell | None = None

    @property
    def state_path(self) -> Path:
        return self.run_dir / "experiment.json"


@dataclass
class ExperimentPlan:
    config: ExperimentConfig
    profile: str | None
    results_dir: Path
    cells: list[Cell]
    evaluation: EvaluationSettings
    #: the ``where`` rules in force: source location, match, set and the ids of the cells they changed
    rules: list[dict[str, Any]] = field(default_factory=list)


def _read_state(cell: Cell) -> dict[str, Any]:
    """The cell's ``experiment.json`` ({} when absent); a damaged one is a one-line CheckpointError."""
    return read_json(cell.state_path, schemas.CellState) if cell.state_path.exists() else {}


def parse_cell_filter(filters: list[str]) -> CellRule:
    """``--only`` filters (``defense=lipschitz,noise_injection``, ``eps=0.3``) as one match rule.

    Each filter is ``AXIS=VALUE[,VALUE...]`` over :data:`MATCH_AXES`; a cell is selected when it matches
    every filter. Lets one process (or machine) run part of a grid into the shared results directory.
    """
    match: dict[str, Any] = {}
    for text in filters:
        key, sep, values = text.partition("=")
        if not sep or not values.strip():
            raise ConfigError(f"--only {text!r}: expected AXIS=VALUE[,VALUE...], e.g. defense=standard,hybrid")
        match.setdefault(key.strip(), []).extend(v.strip() for v in values.split(","))
    rule = CellRule(match=match, set={})
    _check_rule("--only", rule)
    return rule


def select_cells(plan: ExperimentPlan, only: list[str] | None) -> list[Cell]:
    """The plan's cells that ``--only`` selects (all of them without filters); none selected is an error."""
    if not only:
        return plan.cells
    rule = parse_cell_filter(only)
    selected = [cell for cell in plan.cells if _rule_matches(rule, cell.axes)]
    if not selected:
        raise ConfigError(f"--only {' '.join(only)}: matches no cell of the grid")
    return selected


def slug(value: Any, keep: str = "") -> str:
    """``value`` as one safe path component: letters, digits, ``.``, ``_`` and ``keep`` (never ``/``, ``..``).

    Cell ids (``keep=""``) and the default results directory (``keep="-"``) are built from names in the
    experiment file; cleaning them keeps every write under the results directory whatever a name holds.
    """
    text = re.sub(rf"[^A-Za-z0-9._{re.escape(keep)}]+", "_", str(value)).strip("_")
    return "x" if text in ("", ".", "..") else text


def _defense_entry(entry: str | dict[str, Any], index: int) -> tuple[str, dict[str, Any]]:
    """``"trades"`` or ``{name: trades, beta: 6, label: trades6}`` -> (label, defense section)."""
    if isinstance(entry, str):
        return entry, {"name": entry}
    section = dict(entry)
    label = section.pop("label", None)
    if "name" not in section:
        raise ConfigError(f"grid.defenses[{index}]: a defence given as a mapping needs a 'name'")
    params = {k: v for k, v in section.items() if k != "name"}
    if label is None:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
        label = f"{section['name']}_{digest}" if params else section["name"]
    return str(label), section


def _eps_label(eps: float) -> str:
    return f"{eps:.4g}"


def _axis(values: list[Any], default: Any) -> list[Any]:
    return list(values) if values else [default]


def _check_axis(kind: str, index: int, check: Callable[[], None]) -> None:
    try:
        check()
    except RobustlabError as error:
        raise ConfigError(f"grid.{kind}[{index}]: {error}") from None


def _base_config(
    base: dict[str, Any], overrides: list[str] | None, data_dir: str | None
) -> tuple[dict[str, Any], RunConfig]:
    """``base`` with the ``--set`` overrides and ``--data-dir`` applied, and the run config it builds.

    That config holds the value of every axis the grid leaves out, and its threat model bounds eps.
    """
    from robustlab.config import apply_override

    for assignment in overrides or []:
        apply_override(base, assignment)
    if data_dir is not None:
        base = deep_merge(base, {"data": {"data_dir": str(data_dir)}})
    try:
        defaults = build_config(base)
    except RobustlabError as error:
        raise ConfigError(f"base: {error}") from None
    return base, defaults


def _check_grid(grid: GridAxes, defaults: RunConfig) -> tuple[list[tuple[str, dict[str, Any]]], list[float]]:
    """Validate every axis value; returns the defence entries as (label, section) and the eps values as floats."""
    from robustlab.data import validate_dataset_name
    from robustlab.defenses import validate_defense
    from robustlab.models import validate_model_name

    for i, name in enumerate(grid.datasets):
        _check_axis("datasets", i, lambda name=name: validate_dataset_name(name))
    for i, name in enumerate(grid.models):
        _check_axis("models", i, lambda name=name: validate_model_name(name))
    defenses = [_defense_entry(entry, i) for i, entry in enumerate(grid.defenses)]
    for i, (_, section) in enumerate(defenses):
        params = {k: v for k, v in section.items() if k != "name"}
        _check_axis("defenses", i, lambda s=section, p=params: validate_defense(s["name"], p))
    eps_values = []
    for i, value in enumerate(grid.eps):
        try:
            eps = float(parse_number(value))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"grid.eps[{i}]: {error}") from None
        if not 0.0 <= eps <= (1.0 if defaults.threat.norm == "linf" else 64.0):
            norm = defaults.threat.norm
            raise ConfigError(f"grid.eps[{i}]: eps={eps:g} is out of range for the {norm} threat model")
        eps_values.append(eps)
    return defenses, eps_values


def _make_cell(
    base: dict[str, Any],
    axes: dict[str, Any],
    section: dict[str, Any],
    rules: list[tuple[str, CellRule]],
    applied: dict[str, list[str]],
    results_dir: Path,
) -> Cell:
    """The cell at ``axes``: ``base`` with the axes, the defence ``section`` and every matching rule merged in.

    The ids of the cells a rule changed are recorded in ``applied``; ``axes`` gains the cell's norm.
    """
    dataset, model, label, eps, seed = (axes[k] for k in ("dataset", "model", "defense", "eps", "seed"))
    cell_id = "-".join(slug(v) for v in (dataset, model, label, f"eps{_eps_label(eps)}", f"s{seed}"))
    raw = deep_merge(
        base,
        {
            "seed": seed,
            "data": {"dataset": dataset},
            "model": {"name": model},
            "threat": {"eps": eps},
        },
    )
    raw["defense"] = dict(section)
    matched = [(loc, rule) for loc, rule in rules if _rule_matches(rule, axes)]
    for location, rule in matched:
        raw = deep_merge(raw, rule.set)
        applied[location].append(cell_id)
    try:
        cell_config = build_config(raw)
    except RobustlabError as error:
        via = f" (with {', '.join(loc for loc, _ in matched)})" if matched else ""
        raise ConfigError(f"cell {cell_id}{via}: {error}") from None
    axes["norm"] = cell_config.threat.norm
    return Cell(cell_id, cell_config, results_dir / "runs" / cell_id, axes)


def plan_experiment(
    config: ExperimentConfig,
    results_dir: str | Path,
    *,
    profile: str | None = None,
    data_dir: str | None = None,
    overrides: list[str] | None = None,
) -> ExperimentPlan:
    """Expand the grid into cells and validate every cell's run config (no training, no data loading).

    Raises ConfigError naming the offending field (``grid.defenses[2]``, ``grid.eps[0]``, ``base.train.lr``).
    """
    base, grid, evaluation, rules = _apply_profile(config, profile)
    for location, rule in rules:
        _check_rule(location, rule)
    applied: dict[str, list[str]] = {location: [] for location, _ in rules}
    base, defaults = _base_config(base, overrides, data_dir)
    defenses, eps_values = _check_grid(grid, defaults)

    results_dir = Path(results_dir)
    default_defense = (defaults.defense.name, {"name": defaults.defense.name, **defaults.defense.params})
    points = itertools.product(
        _axis(grid.datasets, defaults.data.dataset),
        _axis(grid.models, defaults.model.name),
        _axis(defenses, default_defense),
        _axis(eps_values, defaults.threat.eps),
        _axis(grid.seeds, defaults.seed),
    )
    cells: list[Cell] = []
    for dataset, model, (label, section), eps, seed in points:
        axes = {"dataset": dataset, "model": model, "defense": label, "defense_name": section["name"]}
        axes.update(eps=eps, seed=seed)
        cells.append(_make_cell(base, axes, section, rules, applied, results_dir))
    unused = next((location for location, ids in applied.items() if not ids), None)
    if unused is not None:
        raise ConfigError(f"{unused}: matches no cell of the grid (check its match values against grid axes)")
    check_evaluation(evaluation)
    _link_twins(cells)
    ids = [c.id for c in cells]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(
            f"grid: two cells share the id '{duplicates[0]}' (eps too close, or a defence listed twice)"
        )
    rule_records = [
        {"source": location, "match": rule.match, "set": rule.set, "cells": applied[location]}
        for location, rule in rules
    ]
    return ExperimentPlan(config, profile, results_dir, cells, evaluation, rule_records)


def _link_twins(cells: list[Cell]) -> None:
    """Point each cell whose training ignores eps at the first cell with the same training config."""
    from robustlab.training import training_uses_eps

    first: dict[str, Cell] = {}
    for cell in cells:
        if training_uses_eps(cell.config):
            continue
        training = config_to_dict(cell.config)
        training["threat"] = {k: v for k, v in training["threat"].items() if k != "eps"}
        twin = first.setdefault(json.dumps(training, sort_keys=True, default=str), cell)
        cell.twin = twin if twin is not cell else None
