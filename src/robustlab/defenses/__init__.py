"""Training defences (objectives) and input-transform defences, by name.

``build_objective("pgd_at", {"steps": 10})`` validates the parameters against the objective's own
``Params`` model, so a misspelt parameter names the ones the defence accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from robustlab.defenses.base import Objective, ObjectiveParams, TrainState
from robustlab.defenses.standard import StandardObjective
from robustlab.errors import ConfigError

__all__ = [
    "DEFENSES",
    "Objective",
    "ObjectiveParams",
    "StandardObjective",
    "TrainState",
    "build_objective",
    "register_defense",
    "validate_defense",
]

DEFENSES: dict[str, type[Objective]] = {}


def register_defense(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by its ``name``."""
    DEFENSES[cls.name] = cls
    return cls


register_defense(StandardObjective)


def _params(name: str, params: dict[str, Any]) -> ObjectiveParams:
    if name not in DEFENSES:
        raise ConfigError(f"unknown defense '{name}'; valid: {', '.join(sorted(DEFENSES))}")
    model = DEFENSES[name].Params
    try:
        return model.model_validate(params)
    except ValidationError as error:
        problems = []
        allowed = ", ".join(sorted(model.model_fields)) or "(none)"
        for item in error.errors():
            where = "defense." + ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown key '{where}' for defense '{name}'; allowed: {allowed}")
            else:
                problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None


def validate_defense(name: str, params: dict[str, Any]) -> None:
    """Raise ConfigError unless ``name`` is registered and ``params`` fit its Params model."""
    _params(name, params)


def build_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    """Instantiate a registered training objective with validated parameters."""
    return DEFENSES[name](_params(name, params or {}))
