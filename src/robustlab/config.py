"""Validated run configuration: YAML in, clear errors out.

A run is described by :class:`RunConfig` (data, model, optimisation, threat model, defence). Every
section forbids unknown keys, so a typo such as ``train.epoch`` is reported with the allowed names.
Overrides use dotted paths (``--set train.epochs=5``) and values are parsed as YAML; budgets accept
fractions such as ``8/255``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from robustlab.errors import ConfigError

#: Seeds go to Python, NumPy (32-bit) and torch generators; larger ones would fail mid-run, so refuse them here.
MAX_SEED = 2**32 - 1

#: A config is a few kilobytes; a larger "config" is a mistake (a data file passed by accident).
MAX_CONFIG_BYTES = 16 * 2**20

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def parse_number(value: Any) -> Any:
    """Accept ``"8/255"`` (and plain numbers) wherever a budget or rate is expected."""
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            denominator = float(match.group(2))
            if denominator == 0:
                raise ValueError("division by zero")
            return float(match.group(1)) / denominator
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}") from None
    return value


Rate = Annotated[float, BeforeValidator(parse_number), Field(gt=0.0, le=10.0)]


def refuse_boolean(model: type[BaseModel], name: str | None, value: Any) -> Any:
    """Refuse ``true``/``false`` for a field that is not boolean (pydantic would read ``epochs: true`` as 1)."""
    field = model.model_fields.get(name or "")
    annotation = str(field.annotation) if field is not None else ""
    if isinstance(value, bool) and "bool" not in annotation and ("int" in annotation or "float" in annotation):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are re-validated, booleans are not numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_boolean(cls, info.field_name, value)


class DataConfig(Section):
    dataset: str = "digits"
    data_dir: str | None = None
    val_size: int = Field(default=1000, ge=1, description="validation images carved from the train split")
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    augment: Literal["auto", "none", "flip", "crop", "crop_flip"] = "auto"
    train_subset: int | None = Field(default=None, ge=1, description="train on a seeded random N of the train images")
    test_subset: int | None = Field(default=None, ge=1, description="test on a seeded random N of the test images")

    @model_validator(mode="after")
    def _known_dataset(self) -> DataConfig:
        from robustlab.data import validate_dataset_name

        validate_dataset_name(self.dataset)
        return self


class ModelConfig(Section):
    name: str = "lenet5"
    depth: int | None = Field(default=None, ge=10, le=106)
    width: int | None = Field(
        default=None, ge=1, le=1024,
        description="wide_resnet: widening factor (<= 20); resnet18 / preact_resnet18: first-stage channels (64); "
                    "efficientnet_b0: stem channels (32), every stage scaled alike",
    )

    @model_validator(mode="after")
    def _known_model(self) -> ModelConfig:
        from robustlab.models import WIDTH_MODELS, validate_model_name

        validate_model_name(self.name)
        if self.width is not None:
            if self.name == "wide_resnet" and self.width > 20:
                raise ValueError(f"width={self.width}: wide_resnet's widening factor must be <= 20")
            if self.name not in (*WIDTH_MODELS, "wide_resnet"):
                raise ValueError(f"model '{self.name}' takes no width (models with one: wide_resnet, "
                                 f"{', '.join(WIDTH_MODELS)})")
        return self


class TrainConfig(Section):
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Rate = 0.01
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    schedule: Literal["constant", "piecewise", "cosine", "onecycle"] = "cosine"
    milestones: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.5, 0.75], description="fractions of training, each in [0, 1]"
    )
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    select: Literal["auto", "last", "val_clean", "val_robust"] = Field(
        default="auto",
        description="checkpoint kept: auto = best validation robust accuracy for adversarial objectives "
        "(never an eps warm-up epoch), best validation clean accuracy otherwise",
    )
    val_attack_steps: int = Field(default=10, ge=1, le=1000)
    val_robust_size: int = Field(default=500, ge=1)
    amp: bool = Field(default=False, description="bfloat16 autocast for the training step, crafting attack included")
    channels_last: bool = Field(default=False, description="channels-last memory layout for model and batches")
    compile: bool = Field(default=False, description="torch.compile the model before training")
    device: str = "auto"
    deterministic: bool = False


class ThreatConfig(Section):
    """The threat model shared by adversarial training and evaluation: pixel-space budget and norm."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Annotated[float, BeforeValidator(parse_number), Field(ge=0.0, le=64.0)] = 0.3

    @model_validator(mode="after")
    def _pixel_range(self) -> ThreatConfig:
        if self.norm == "linf" and self.eps > 1.0:
            raise ValueError(f"eps={self.eps:g} exceeds the [0, 1] pixel range for an Linf budget")
        return self


class DefenseConfig(BaseModel):
    """``name`` picks a training objective; the remaining keys are that objective's parameters.

    Parameters are validated against the objective's own params model (see ``robustlab.defenses``), so
    a misspelt parameter is reported with the names the chosen defence accepts.
    """

    model_config = ConfigDict(extra="allow")
    name: str = "standard"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_defense(self) -> DefenseConfig:
        from robustlab.defenses import validate_defense

        validate_defense(self.name, self.params)
        return self


class RunConfig(Section):
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return model


def _printable(text: str) -> str:
    """Escape control characters (a key with a newline must not break the one-line error)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: dotted field name, what is wrong, and the allowed names for unknown keys."""
    lines = []
    for item in error.errors():
        loc = tuple(_printable(str(p)) for p in item["loc"])
        where = ".".join(loc) or "config"
        if item["type"] == "extra_forbidden":
            section = _section_at(loc)
            allowed = _field_names(section)
            # a section's key written at the top level ("dataset: digits" for "data: {dataset: digits}")
            sections = {name: _section_at((name, loc[-1])) for name in allowed}
            home = [f"{name}.{loc[-1]}" for name, model in sections.items()
                    if model is not RunConfig and loc[-1] in model.model_fields]
            close = home if len(loc) == 1 and home else difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{where}'{hint}; allowed: {', '.join(allowed)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}")
    return "; ".join(lines)


#: Fields that older run directories may still carry in config.yaml. They are dropped (with a warning)
#: when a saved run is read, so retiring a field never makes a computed run unreadable.
RETIRED_KEYS: dict[tuple[str, str], str] = {
    ("train", "log_every"): "it never changed anything (progress is per batch, history per epoch)",
}


def drop_retired_keys(raw: dict[str, Any]) -> list[str]:
    """Remove :data:`RETIRED_KEYS` from a saved config dict in place; return one note per key removed."""
    notes = []
    for (section, key), why in RETIRED_KEYS.items():
        block = raw.get(section)
        if isinstance(block, dict) and key in block:
            del block[key]
            notes.append(f"ignored retired config key '{section}.{key}': {why}")
    return notes


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a RunConfig, raising ConfigError with field names on failure."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing, unreadable or malformed file."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # /dev/zero or a FIFO would be read forever
            raise ConfigError(f"config file {path} is not a regular file")
        if path.exists() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"malformed YAML in {path}: nested too deeply") from None
    except Exception as error:  # PyYAML's constructors fail on some tagged scalars (e.g. a bare `!!float`)
        raise ConfigError(f"malformed YAML in {path}: {type(error).__name__}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping (key: value), got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, _, text = assignment.partition("=")
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except Exception:  # not YAML (or YAML that PyYAML cannot construct): keep the text as given
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a RunConfig from an optional YAML file, a base dict, and ``key=value`` overrides."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = deep_merge(raw, read_yaml(path))
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return build_config(raw)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``update`` (neither input is modified)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of the config (defence parameters inlined)."""
    return config.model_dump(mode="json")


#: Settings that change how a run executes, not what it trains: the same model up to float rounding,
#: as on another machine. A run resumes, and a grid keeps a finished cell, across a change of these.
EXECUTION_SETTINGS = (("train", "device"), ("train", "channels_last"))


def execution_of(config: RunConfig) -> dict[str, Any]:
    """The :data:`EXECUTION_SETTINGS` of a run, keyed ``section.key`` (``{"train.channels_last": True, ...}``)."""
    return {f"{section}.{key}": getattr(getattr(config, section), key) for section, key in EXECUTION_SETTINGS}


#: Where a run reads its data from: a path on one machine, not what it trains (``data.dataset`` names
#: the data, and torchvision checks every file's md5), so a committed grid continues on another machine.
LOCATION_SETTINGS = (("data", "data_dir"),)


def trained_identity(config: RunConfig) -> dict[str, Any]:
    """:func:`config_to_dict` without :data:`EXECUTION_SETTINGS` and :data:`LOCATION_SETTINGS`: equal for runs
    that train the same model."""
    identity = config_to_dict(config)
    for section, key in EXECUTION_SETTINGS + LOCATION_SETTINGS:
        identity[section].pop(key, None)
    return identity
