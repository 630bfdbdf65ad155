"""The experiment file's schema: grid axes, evaluation settings, ``where`` rules and profiles.

:func:`load_experiment` validates a YAML (or dict) into an :class:`ExperimentConfig`; unknown keys and
bad values are one-line :class:`~robustlab.errors.ConfigError` naming the field. Profiles (built in and
the file's own) and ``where`` rules are resolved here; the evaluation settings are checked against
:func:`robustlab.evaluation.evaluate_run` (and ``robustlab.audit``) before any cell trains.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from robustlab.config import deep_merge, parse_number, read_yaml
from robustlab.errors import ConfigError, RobustlabError


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
#: ``quick`` fits a 2-CPU-core machine: subsets, two epochs, cheap attacks, no AutoAttack (its
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


def _evaluation_kwargs(settings: EvaluationSettings, device: str) -> dict[str, Any]:
    """Keyword arguments for :func:`robustlab.evaluation.evaluate_run` (validated by ``check_evaluation``)."""
    common = {"attacks": settings.attacks, "suite": settings.suite, "n": settings.n, "subset": settings.subset}
    return {**{k: v for k, v in common.items() if v is not None}, **settings.options, "device": device}


def _accepted(*functions: Callable[..., Any], exclude: set[str]) -> set[str]:
    return {name for f in functions for name in inspect.signature(f).parameters} - exclude


def check_evaluation(settings: EvaluationSettings) -> None:
    """Validate attacks, suite and the option names of evaluation and audit before anything trains."""
    from robustlab.attacks import make_attack
    from robustlab.evaluation import SUITES, evaluate_run

    for i, spec in enumerate(settings.attacks or []):
        try:
            make_attack(spec, eps=0.0)  # names and parameters (types, counts), before hours of training
        except RobustlabError as error:
            raise ConfigError(f"evaluation.attacks[{i}]: {error}") from None
    if settings.suite is not None and settings.suite not in SUITES:
        raise ConfigError(f"evaluation.suite: unknown suite '{settings.suite}'; valid: {', '.join(sorted(SUITES))}")
    internal = {"run_dir", "write", "device", "model", "data", "options", "self", "progress", "checkpoint", "overwrite"}
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
