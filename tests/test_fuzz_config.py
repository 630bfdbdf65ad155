"""Fuzzing the config loader: for ANY text, dict or override the only possible error is a ConfigError.

``read_yaml`` gets arbitrary text (and YAML-shaped text), ``build_config`` arbitrary nested dicts whose
keys are mostly the real field names (so the fuzzing reaches the value validators), ``load_config``
arbitrary ``--set`` overrides. A config that validates must also survive the round trip through the
run directory's ``config.yaml`` unchanged (resuming compares them) and must be usable by the training
set-up code that reads plain values out of it (seeding).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustlab.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    ThreatConfig,
    TrainConfig,
    build_config,
    config_to_dict,
    load_config,
    read_yaml,
)
from robustlab.errors import ConfigError, RobustlabError
from robustlab.runs import seed_everything

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS: dict[str, list[str]] = {
    "data": list(DataConfig.model_fields),
    "model": list(ModelConfig.model_fields),
    "train": list(TrainConfig.model_fields),
    "threat": list(ThreatConfig.model_fields),
    "defense": ["name", "beta", "attack", "steps", "alpha", "start_fraction", "schedule", "ramp_epochs"],
}
NAMES = ["digits", "mnist", "lenet5", "resnet18", "standard", "pgd_at", "trades", "hybrid", "fgsm", "pgd-2",
         "linf", "l2", "cosine", "8/255", "1/0", "0.3", "-1", "nan", "inf", "auto", "cpu", "cuda:7"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(NAMES),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3), max_leaves=8)


def section(name: str) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(SECTIONS[name]) | st.text(max_size=8)
    return st.dictionaries(keys, values, max_size=4)


raw_configs = st.fixed_dictionaries(
    {},
    optional={
        "seed": values,
        **{name: section(name) | values for name in SECTIONS},
        "extra": values,
    },
)


def _read_text(text: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return read_yaml(path)


def _check_valid(config: RunConfig) -> None:
    """A config that validates round-trips through config.yaml and seeds the RNGs without error."""
    dumped = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    assert config_to_dict(build_config(yaml.safe_load(dumped))) == config_to_dict(config)
    seed_everything(config.seed)


@FUZZ
@given(st.text(max_size=200))
def test_read_yaml_arbitrary_text(text):
    try:
        data = _read_text(text)
    except RobustlabError:
        return
    assert isinstance(data, dict)
    with contextlib.suppress(RobustlabError):
        _check_valid(build_config(data))


YAML_TOKENS = ["train:", "  epochs:", " 3", "\n", "- ", "{", "}", "[", "]", ": ", "&a ", "*a ", "!!binary ", "? ",
               "!!python/name:os.system", "|", ">", "'", '"', "#", "\t", "---", "...", "%YAML 1.1", "!!float", "8/255"]
yaml_like = st.lists(
    st.one_of(
        st.sampled_from(YAML_TOKENS),
        st.text(max_size=4),
    ),
    max_size=40,
).map("".join)


@FUZZ
@given(yaml_like)
def test_read_yaml_yaml_shaped_text(text):
    with contextlib.suppress(RobustlabError):
        _check_valid(build_config(_read_text(text)))


@FUZZ
@given(raw_configs)
def test_build_config_arbitrary_nested_dicts(raw):
    try:
        config = build_config(raw)
    except RobustlabError as error:
        assert str(error) and "\n" not in str(error).strip()
        return
    _check_valid(config)


@FUZZ
@given(st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + ["seed", "data", "train.epochs.x", ".", ""]
), st.text(max_size=12) | st.sampled_from(NAMES)), max_size=4))
def test_load_config_arbitrary_overrides(overrides):
    try:
        config = load_config(None, overrides)
    except RobustlabError:
        return
    _check_valid(config)


@pytest.mark.parametrize(
    "text",
    ["[" * 1500, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 1500)),
     "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b]\n"
     "train: {milestones: [*c, *c, *c, *c, *c, *c, *c, *c]}\n"],
    ids=["deep-flow", "deep-block", "alias-bomb"],
)
def test_pathological_yaml(text):
    with pytest.raises(RobustlabError):
        build_config(_read_text(text))
    with pytest.raises(RobustlabError):
        load_config(None, [f"train.milestones={text}"])


@pytest.mark.parametrize("seed", [2**64, -(2**64), 2**63 - 1])
def test_seeds_the_rngs_cannot_take_are_refused(seed):
    with pytest.raises(ConfigError, match="seed"):
        build_config({"seed": seed})
    with pytest.raises(ConfigError, match="split_seed"):
        build_config({"data": {"split_seed": seed}})
