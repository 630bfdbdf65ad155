"""Training defences (objectives) and input-transform defences, by name.

``build_objective("pgd_at", {"steps": 10})`` validates the parameters against the objective's own
``Params`` model, so a misspelt parameter names the ones the defence accepts.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from robustlab.defenses.adversarial import (
    AdversarialObjective,
    FastATObjective,
    MartObjective,
    PGDATObjective,
    TradesObjective,
    craft_adversarial,
)
from robustlab.defenses.base import Objective, ObjectiveParams, TrainState
from robustlab.defenses.hybrid import HybridObjective, adaptive_alpha
from robustlab.defenses.lipschitz import LipschitzObjective
from robustlab.defenses.preprocessed import (
    AutoencoderObjective,
    FeatureSqueezingObjective,
    NoiseInjectionObjective,
)
from robustlab.defenses.preprocessing import (
    Defended,
    DenoisingAutoencoder,
    FeatureSqueezing,
    GaussianNoise,
    InputTransform,
    build_transform,
)
from robustlab.defenses.schedule import eps_schedule
from robustlab.defenses.standard import StandardObjective
from robustlab.errors import ConfigError

__all__ = [
    "DEFENSES",
    "AdversarialObjective",
    "AutoencoderObjective",
    "Defended",
    "DenoisingAutoencoder",
    "FastATObjective",
    "FeatureSqueezing",
    "FeatureSqueezingObjective",
    "GaussianNoise",
    "HybridObjective",
    "InputTransform",
    "LipschitzObjective",
    "MartObjective",
    "NoiseInjectionObjective",
    "Objective",
    "ObjectiveParams",
    "PGDATObjective",
    "StandardObjective",
    "TradesObjective",
    "TrainState",
    "adaptive_alpha",
    "build_input_transform",
    "build_objective",
    "build_transform",
    "craft_adversarial",
    "eps_schedule",
    "register_defense",
    "validate_defense",
]

DEFENSES: dict[str, type[Objective]] = {}


def register_defense(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by its ``name``."""
    DEFENSES[cls.name] = cls
    return cls


for _objective in (
    StandardObjective, PGDATObjective, FastATObjective, TradesObjective, MartObjective, LipschitzObjective,
    HybridObjective, FeatureSqueezingObjective, NoiseInjectionObjective, AutoencoderObjective,
):
    register_defense(_objective)


def _params(name: str, params: dict[str, Any]) -> ObjectiveParams:
    if name not in DEFENSES:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), list(DEFENSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown defense '{name}'{hint}; valid: {', '.join(sorted(DEFENSES))}")
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


def build_input_transform(name: str, params: dict[str, Any] | None, channels: int) -> InputTransform | None:
    """The input transform a defence puts in front of the classifier (None for pure objectives)."""
    return build_objective(name, params).input_transform(channels)
