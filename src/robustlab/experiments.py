"""The experiment grid runner: one YAML -> many run directories -> one results table (resumable).

An experiment file holds a *base* run config (the sections of :class:`robustlab.config.RunConfig`),
*grid* axes (datasets x models x defences x eps x seeds), *evaluation* settings handed to
:func:`robustlab.evaluation.evaluate_run`, and optional per-profile overrides::

    name: paper-mnist
    base: {data: {dataset: mnist}, model: {name: lenet5}, train: {epochs: 50}}
    grid:
      defenses: [standard, pgd_at, {name: trades, beta: 6.0}, hybrid]
      eps: [0.03, 0.3]
      seeds: [0]
    evaluation: {attacks: [fgsm, pgd-20, cw_linf-30]}
    where:                       # settings for some cells only
      - {match: {eps: 0.3, defense: pgd_at}, set: {defense: {eps_warmup: 5}}}
    profiles:
      quick: {base: {data: {train_subset: 5000}}, evaluation: {attacks: [fgsm, pgd-10]}}

Two profiles are built in (paper section 4.5 and the 2-core budget of this project): ``paper`` sets the
paper's hyper-parameters (SGD, lr 0.01, batch 128, 50 epochs; momentum 0.9 and weight decay 5e-4, the
field's defaults, because the paper does not state its optimiser) and ``quick`` trains few epochs on
data subsets and evaluates with cheap attacks. The file's own ``profiles`` section is merged on top.
``where`` rules (top level, or in a profile) merge settings into the cells they match, e.g. an eps
warm-up only where the eps is large; ``experiment.json`` lists each rule with the cells it changed.

Every cell is validated (names, eps range, data present) before any training starts. Each cell is a
run directory ``RESULTS_DIR/runs/<cell-id>`` trained in its own process (so CPU peak memory is per
cell): a finished one is skipped, an unfinished one resumes through the Trainer's resume (the runner's
own progress is kept in ``runs/<cell-id>/experiment.json``), and a per-cell file lock lets several
processes share one results directory without running a cell twice. A cell whose training ignores eps
(standard training and the preprocessing defences, unless validation PGD runs) is not trained again
for every eps: it shares the training of the first cell that differs from it only in eps, copied into
its own run directory (``metadata.json`` names it: ``training_shared_with``). After training each cell is
evaluated, audited when ``robustlab.audit`` is available, and ``RESULTS_DIR/results.csv`` /
``results.json`` are rewritten (after every cell, so a partly done grid can already be reported).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from robustlab import schemas
from robustlab.config import RunConfig, build_config, config_to_dict, deep_merge, parse_number, read_yaml
from robustlab.data import DatasetSplits
from robustlab.errors import ConfigError, RobustlabError
from robustlab.rundir import RunDir, read_csv, read_json, write_csv, write_json
from robustlab.runs import prepare_data

__all__ = [
    "BUILTIN_PROFILES",
    "Cell",
    "CellRule",
    "EvaluationSettings",
    "ExperimentConfig",
    "ExperimentPlan",
    "ExperimentResult",
    "GridAxes",
    "Profile",
    "cell_row",
    "check_evaluation",
    "collect_results",
    "load_experiment",
    "plan_experiment",
    "run_cell",
    "run_experiment",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridAxes(_Strict):
    """Axes of the grid; an empty axis means "the value in ``base``"."""

    datasets: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    defenses: list[str | dict[str, Any]] = Field(default_factory=list)
    eps: list[float | str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)

    @field_validator("*")
    @classmethod
    def _not_empty(cls, values: list[Any]) -> list[Any]:
        """An axis written as ``[]`` is a mistake (it would quietly run ``base``'s value); leave it out instead."""
        if not values:
            raise ValueError("empty list; list at least one value, or leave the key out to use base's value")
        return values


class EvaluationSettings(_Strict):
    """What ``evaluate_run`` is asked to measure for every cell.

    ``attacks``, ``suite``, ``n`` and ``subset`` (which ``n`` test images the attacks see: ``random``, a
    fixed-seed random ``n``, or ``first``, RobustBench's convention) are the common knobs (``suite`` unset:
    ``standard``, AutoAttack-grade, as for ``robustlab evaluate``; ``quick``: upper bounds only); clean
    accuracy is measured on every test image either way. ``options`` passes further keywords of
    ``evaluate_run`` (e.g. ``eot_samples``). ``audit`` runs ``robustlab.audit.audit_run`` (when that
    module exists) with ``audit_options`` (e.g. ``n``, ``surrogate_epochs``, ``square_queries``).
    All names are checked before any training starts.
    """

    attacks: list[str | dict[str, Any]] | None = None
    suite: str | None = None
    n: int | None = Field(default=None, ge=1)
    subset: Literal["random", "first"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    audit: bool = True
    audit_options: dict[str, Any] = Field(default_factory=dict)


#: Grid axes a ``where`` rule can match on (``defense`` is the entry's label, ``defense_name`` the defence).
MATCH_AXES = ("dataset", "model", "defense", "defense_name", "eps", "seed")
#: Config fields the grid axes own: a rule that set them would give a cell the wrong id.
_AXIS_FIELDS = (("seed",), ("data", "dataset"), ("model", "name"), ("defense", "name"), ("threat", "eps"))


class CellRule(_Strict):
    """Settings for some cells only: ``set`` is merged into the config of every cell ``match`` selects.

    ``match`` maps grid axes (:data:`MATCH_AXES`) to a value or a list of values; a cell matches when
    every axis does. Example (``configs/paper/mnist.yaml``): PGD-style training at eps 0.3 reaches its
    budget through an eps warm-up, which the same defences at eps 0.03 do not need::

        where:
          - match: {eps: 0.3, defense: [pgd_at, trades, mart, fast_at]}
            set: {defense: {eps_warmup: 5}}
    """

    match: dict[str, Any]
    set: dict[str, Any]


class Profile(_Strict):
    """Overrides applied by ``--profile``: merged into ``base``, replacing grid axes and evaluation keys.

    Its ``where`` rules are added to the file's own.
    """

    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    where: list[CellRule] = Field(default_factory=list)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: GridAxes = Field(default_factory=GridAxes)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    where: list[CellRule] = Field(default_factory=list)
    profiles: dict[str, Profile] = Field(default_factory=dict)


#: Paper section 4.5: "a learning rate of 0.01, batch size of 128, and 50 training epochs ... eps 0.03".
#: ``quick`` is this project's 2-CPU-core budget: subsets, two epochs, cheap attacks, no AutoAttack (its
#: robust numbers are upper bounds, and say so).
BUILTIN_PROFILES: dict[str, Profile] = {
    "paper": Profile(
        base={
            "train": {
                "epochs": 50,
                "batch_size": 128,
                "optimizer": "sgd",
                "lr": 0.01,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "schedule": "constant",
            },
            "threat": {"eps": 0.03},
        },
    ),
    "quick": Profile(
        base={
            "train": {"epochs": 2, "val_robust_size": 200, "val_attack_steps": 5},
            "data": {"train_subset": 2000, "val_size": 500, "test_subset": 500},
        },
        evaluation={"attacks": ["fgsm", "pgd-10", "cw_linf-10"], "suite": "quick"},
    ),
}


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


@dataclass
class ExperimentResult:
    results_dir: Path
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)  # locked by another process, not waited for
    seconds: float = 0.0


# --- loading and validation ---------------------------------------------------------------------
def _format(error: ValidationError, where: str) -> str:
    problems = []
    for item in error.errors():
        loc = ".".join([*([where] if where else []), *(str(p) for p in item["loc"])])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{loc}'")
        else:
            problems.append(f"{loc or 'experiment'}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _validate(model: type[BaseModel], raw: Any, where: str) -> Any:
    """Validate ``raw`` against an experiment-file model; unknown keys name the allowed ones."""
    if isinstance(raw, dict):
        extra = sorted(set(raw) - set(model.model_fields))
        if extra:
            loc = f"{where}.{extra[0]}" if where else extra[0]
            allowed = ", ".join(sorted(model.model_fields))
            raise ConfigError(f"unknown key '{loc}' in experiment config; allowed: {allowed}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format(error, where)) from None


def load_experiment(path: str | Path | dict[str, Any]) -> ExperimentConfig:
    """Read and validate an experiment YAML (or dict); unknown keys are one-line errors naming the field."""
    raw = read_yaml(path) if not isinstance(path, dict) else path
    for section, model in (("grid", GridAxes), ("evaluation", EvaluationSettings)):
        if isinstance(raw.get(section), dict):
            _validate(model, raw[section], section)
    for name, profile in (raw.get("profiles") or {}).items() if isinstance(raw.get("profiles"), dict) else ():
        _validate(Profile, profile, f"profiles.{name}")
    return _validate(ExperimentConfig, raw, "")


def _apply_profile(
    config: ExperimentConfig, name: str | None
) -> tuple[dict[str, Any], GridAxes, EvaluationSettings, list[tuple[str, CellRule]]]:
    base, grid = dict(config.base), config.grid.model_dump(exclude_unset=True)
    evaluation = config.evaluation.model_dump()
    rules = [(f"where[{i}]", rule) for i, rule in enumerate(config.where)]
    if name is None:
        return base, config.grid, config.evaluation, rules
    valid = sorted(set(BUILTIN_PROFILES) | set(config.profiles))
    if name not in valid:
        raise ConfigError(f"--profile: unknown profile '{name}'; valid: {', '.join(valid)}")
    for profile in (BUILTIN_PROFILES.get(name), config.profiles.get(name)):
        if profile is None:
            continue
        base = deep_merge(base, profile.base)
        grid.update(profile.grid)
        evaluation.update(profile.evaluation)
        rules += [(f"profiles.{name}.where[{i}]", rule) for i, rule in enumerate(profile.where)]
    where = f"profiles.{name}"
    return (
        base,
        _validate(GridAxes, grid, f"{where}.grid"),
        _validate(EvaluationSettings, evaluation, f"{where}.evaluation"),
        rules,
    )


def _check_rule(location: str, rule: CellRule) -> None:
    """Unknown axes, unreadable eps and fields the grid owns are one-line errors naming the rule."""
    for key, wanted in rule.match.items():
        if key not in MATCH_AXES:
            raise ConfigError(f"{location}.match.{key}: not a grid axis; valid: {', '.join(MATCH_AXES)}")
        if key == "eps":
            for value in wanted if isinstance(wanted, list) else [wanted]:
                try:
                    float(parse_number(value))
                except (ValueError, TypeError) as error:
                    raise ConfigError(f"{location}.match.eps: {error}") from None
    for path in _AXIS_FIELDS:
        section: Any = rule.set
        for key in path:
            section = section.get(key) if isinstance(section, dict) else None
        if section is not None:
            raise ConfigError(f"{location}.set.{'.'.join(path)}: set by the grid axes, not by a rule")


def _rule_matches(rule: CellRule, axes: dict[str, Any]) -> bool:
    for key, wanted in rule.match.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if key == "eps":
            if not any(math.isclose(axes["eps"], float(parse_number(o)), rel_tol=1e-9) for o in options):
                return False
        elif str(axes[key]) not in {str(o) for o in options}:
            return False
    return True


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
    from robustlab.config import apply_override
    from robustlab.data import validate_dataset_name
    from robustlab.defenses import validate_defense
    from robustlab.models import validate_model_name

    base, grid, evaluation, rules = _apply_profile(config, profile)
    for location, rule in rules:
        _check_rule(location, rule)
    applied: dict[str, list[str]] = {location: [] for location, _ in rules}
    for assignment in overrides or []:
        apply_override(base, assignment)
    if data_dir is not None:
        base = deep_merge(base, {"data": {"data_dir": str(data_dir)}})
    try:
        defaults = build_config(base)
    except RobustlabError as error:
        raise ConfigError(f"base: {error}") from None

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

    results_dir = Path(results_dir)
    cells: list[Cell] = []
    default_defense = (defaults.defense.name, {"name": defaults.defense.name, **defaults.defense.params})
    for dataset in _axis(grid.datasets, defaults.data.dataset):
        for model in _axis(grid.models, defaults.model.name):
            for label, section in _axis(defenses, default_defense):
                for eps in _axis(eps_values, defaults.threat.eps):
                    for seed in _axis(grid.seeds, defaults.seed):
                        cell_id = "-".join(
                            slug(v) for v in (dataset, model, label, f"eps{_eps_label(eps)}", f"s{seed}")
                        )
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
                        axes = {
                            "dataset": dataset,
                            "model": model,
                            "defense": label,
                            "defense_name": section["name"],
                            "eps": eps,
                            "seed": seed,
                        }
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
                        cells.append(Cell(cell_id, cell_config, results_dir / "runs" / cell_id, axes))
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


# --- running ------------------------------------------------------------------------------------
def _read_state(cell: Cell) -> dict[str, Any]:
    """The cell's ``experiment.json`` ({} when absent); a damaged one is a one-line CheckpointError."""
    return read_json(cell.state_path, schemas.CellState) if cell.state_path.exists() else {}


def _evaluation_kwargs(settings: EvaluationSettings, device: str) -> dict[str, Any]:
    """Keyword arguments for :func:`robustlab.evaluation.evaluate_run` (validated by ``check_evaluation``)."""
    common = {"attacks": settings.attacks, "suite": settings.suite, "n": settings.n, "subset": settings.subset}
    return {**{k: v for k, v in common.items() if v is not None}, **settings.options, "device": device}


def _accepted(*functions: Callable[..., Any], exclude: set[str]) -> set[str]:
    return {name for f in functions for name in inspect.signature(f).parameters} - exclude


def check_evaluation(settings: EvaluationSettings) -> None:
    """Validate attacks, suite and the option names of evaluation and audit before anything trains."""
    from robustlab.attacks import parse_attack_spec
    from robustlab.evaluation import SUITES, evaluate_run

    for i, spec in enumerate(settings.attacks or []):
        try:
            parse_attack_spec(spec)
        except RobustlabError as error:
            raise ConfigError(f"evaluation.attacks[{i}]: {error}") from None
    if settings.suite is not None and settings.suite not in SUITES:
        raise ConfigError(f"evaluation.suite: unknown suite '{settings.suite}'; valid: {', '.join(sorted(SUITES))}")
    internal = {"run_dir", "write", "device", "model", "data", "options", "self"}
    checks = [("options", settings.options, _accepted(evaluate_run, exclude=internal))]
    audit = _audit_function()
    if audit is not None and settings.audit:
        from robustlab.audit import audit_model

        checks.append(("audit_options", settings.audit_options, _accepted(audit, audit_model, exclude=internal)))
    for section, given, accepted in checks:
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise ConfigError(
                f"evaluation.{section}.{unknown[0]}: not a parameter; accepted: {', '.join(sorted(accepted))}"
            )


def _signature(kwargs: dict[str, Any]) -> Any:
    """The evaluation settings as stored in a cell's state (device excluded: it does not change results)."""
    settings = {k: v for k, v in kwargs.items() if k != "device"}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _audit_function() -> Callable[..., Any] | None:
    try:
        module = importlib.import_module("robustlab.audit")
    except ModuleNotFoundError:
        return None
    return getattr(module, "audit_run", None)


def _config_matches(cell: Cell) -> bool:
    try:
        previous = build_config(RunDir(cell.run_dir).read_config_dict())
    except RobustlabError:
        return False
    return config_to_dict(previous) == config_to_dict(cell.config)


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
        code = "from robustlab.experiments import train_child_main; train_child_main()"
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
) -> bool:
    """Train (or resume), evaluate and audit one cell; returns False when everything was already done."""
    from robustlab.evaluation import evaluate_run
    from robustlab.training import restore_selected_weights

    run = RunDir(cell.run_dir)
    did_work = False
    if run.is_finished():
        if not _config_matches(cell):
            raise RobustlabError(
                f"cell {cell.id}: {cell.run_dir} holds a finished run with a different config; "
                "use another --out (or delete that run directory)"
            )
    elif _twin_trained(cell):
        log(f"[{cell.id}] sharing the training of {cell.twin.id} (it does not depend on eps)")
        _share_training(cell.twin, cell)
        did_work = True
    else:
        log(f"[{cell.id}] training{' (resuming)' if run.exists() else ''}")
        _train(cell, data, progress, isolate)
        did_work = True
    if restore_selected_weights(cell.run_dir):
        log(f"[{cell.id}] model.safetensors restored from resume.pt (trained on another machine)")
    state = _read_state(cell)
    state.pop("error", None)  # an earlier failure of this cell is resolved once it trains
    kwargs = _evaluation_kwargs(settings, cell.config.train.device)
    signature = _signature(kwargs)
    if did_work or state.get("evaluation") != signature:
        log(f"[{cell.id}] evaluating")
        evaluate_run(cell.run_dir, **kwargs)
        state.update(evaluation=signature, evaluated_at=time.time())
        write_json(cell.state_path, state)
        did_work = True
    audit = _audit_function() if settings.audit else None
    if audit is not None and (did_work or not state.get("audited")):
        log(f"[{cell.id}] auditing")
        audit(cell.run_dir, **settings.audit_options)
        state.update(audited=True)
        write_json(cell.state_path, state)
        did_work = True
    if run.resume.exists():  # done: its resume state (weights included) must not stay in a committed results dir
        run.resume.unlink()
    return did_work


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
    names the source (``training_shared_with``). Everything is written into a hidden sibling that is
    renamed into place, so an interruption leaves either no run directory or a complete one.
    """
    origin = RunDir(source.run_dir)
    cell.run_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{cell.id}-", dir=cell.run_dir.parent))
    try:
        run = RunDir(scratch)
        for path in (origin.history, origin.weights, origin.last_weights, origin.resume):
            if path.exists():
                shutil.copy2(path, scratch / path.name)
        run.write_config(config_to_dict(cell.config))
        write_json(run.metrics, {k: v for k, v in origin.read_metrics().items() if k != "evaluations"})
        write_json(run.metadata, {**origin.read_metadata(), "training_shared_with": source.id})
        scratch.rename(cell.run_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


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


def _lock(results_dir: Path, name: str) -> FileLock:
    (results_dir / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(results_dir / "locks" / f"{name}.lock"))


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
) -> ExperimentResult:
    """Validate the whole grid, then train / evaluate / audit every unfinished cell and write results.

    Cells locked by another process are skipped on the first pass and (``wait_for_locked``) waited for
    afterwards, so the results table written at the end covers the whole grid; without waiting they are
    listed in ``ExperimentResult.left`` (a worker that should stop when its own share is done). A cell
    that fails with a user error is recorded (``status = failed``) and the others still run; ``ExperimentResult.failed``
    lists them. ``isolate`` trains each cell in a fresh process (honest per-cell peak memory on CPU);
    ``isolate=False`` trains in this process, reusing the loaded data (faster for tiny grids).
    ``only`` (:func:`parse_cell_filter`) runs part of the grid; the results table still lists every cell.
    """
    started = time.perf_counter()
    if not isinstance(config, ExperimentConfig):
        config = load_experiment(config)
    plan = plan_experiment(config, results_dir, profile=profile, data_dir=data_dir, overrides=overrides)
    selected = select_cells(plan, only)
    pending = [c for c in selected if not _cell_done(c, plan.evaluation)]
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
            _run_locked(cell, plan, data, result, progress, log, isolate)
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
            _run_locked(cell, plan, data, result, progress, log, isolate)
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


def _cell_done(cell: Cell, settings: EvaluationSettings) -> bool:
    state = _read_state(cell)  # read first: a damaged file stops the grid before any work, not midway
    if not RunDir(cell.run_dir).is_finished():
        return False
    kwargs = _evaluation_kwargs(settings, cell.config.train.device)
    signature = _signature(kwargs)
    audited = state.get("audited") or not settings.audit or _audit_function() is None
    return state.get("evaluation") == signature and bool(audited)


def _run_locked(
    cell: Cell,
    plan: ExperimentPlan,
    data: dict[str, DatasetSplits],
    result: ExperimentResult,
    progress: bool,
    log: Callable[[str], None],
    isolate: bool,
) -> None:
    try:
        did = run_cell(
            cell,
            plan.evaluation,
            data.get(_data_key(cell.config)),
            progress=progress,
            log=log,
            isolate=isolate,
        )
    except RobustlabError as error:
        log(f"[{cell.id}] failed: {error}")
        result.failed[cell.id] = str(error)
        state = _read_state(cell)
        state["error"] = str(error)
        if cell.run_dir.exists():
            write_json(cell.state_path, state)
        return
    (result.ran if did else result.skipped).append(cell.id)
    if not did:
        log(f"[{cell.id}] already finished; skipped")


# --- results ------------------------------------------------------------------------------------
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


def cell_row(cell: Cell) -> dict[str, Any]:
    """One results row: axes, status, clean / per-attack / worst-case accuracy, gaps, cost, audit verdict.

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
        row["audit_verdict"] = read_json(audit_path, schemas.Audit).get("verdict")
    row["evaluation"] = entry
    return row


def collect_results(plan: ExperimentPlan, failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rewrite ``results.csv`` and ``results.json`` from every cell's run directory (under a lock).

    ``failed`` adds this invocation's failures of cells that never got a run directory.
    """
    rows = [cell_row(cell) for cell in plan.cells]
    for row in rows:
        if failed and row["cell"] in failed and row["status"] != "failed":
            row.update(status="failed", error=failed[row["cell"]])
    with _lock(plan.results_dir, "results"):
        summary = {"experiment": plan.config.name, "profile": plan.profile, "rows": rows}
        write_json(plan.results_dir / "results.json", summary)
        flat = [{k: v for k, v in row.items() if k != "evaluation"} for row in rows]
        write_csv(plan.results_dir / "results.csv", flat)
    return rows
