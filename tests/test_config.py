"""Config validation: unknown keys and bad values are reported by field name with the allowed values."""

from __future__ import annotations

import pytest

from robustlab.config import apply_override, build_config, load_config, parse_number
from robustlab.errors import ConfigError, DataError


def test_defaults_validate():
    config = build_config({})
    assert config.data.dataset == "digits"
    assert config.defense.name == "standard"


def test_fraction_budgets_are_parsed():
    assert parse_number("8/255") == pytest.approx(8 / 255)
    assert build_config({"threat": {"eps": "8/255"}}).threat.eps == pytest.approx(8 / 255)


def test_unknown_key_names_field_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*did you mean 'epochs'.*allowed: .*epochs"):
        build_config({"train": {"epoch": 3}})


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        build_config({"trian": {}})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"threat": {"eps": -0.1}}, "threat.eps"),
        ({"threat": {"eps": 2.0}}, "threat"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
    ],
)
def test_out_of_range_values_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{field}"):
        build_config(raw)


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'sgd' or 'adam'"):
        build_config({"train": {"optimizer": "rmsprop"}})


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match=r"unknown dataset 'mnits'; valid: digits, mnist, cifar10"):
        build_config({"data": {"dataset": "mnits"}})


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown model 'lenet'; valid: lenet5, small_cnn"):
        build_config({"model": {"name": "lenet"}})


def test_unknown_defense_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown defense 'magic'; valid: .*standard"):
        build_config({"defense": {"name": "magic"}})


def test_a_hyphenated_or_capitalised_defense_name_points_to_the_registered_one():
    with pytest.raises(ConfigError, match=r"unknown defense 'pgd-at' \(did you mean 'pgd_at'\?\)"):
        build_config({"defense": {"name": "pgd-at"}})


def test_a_sections_key_written_at_the_top_level_points_to_its_section():
    with pytest.raises(ConfigError, match=r"unknown key 'dataset' \(did you mean 'data.dataset'\?\)"):
        build_config({"dataset": "digits"})


def test_overrides_are_yaml_values_on_dotted_paths():
    raw: dict = {}
    apply_override(raw, "train.epochs=5")
    apply_override(raw, "threat.eps=8/255")
    apply_override(raw, "train.amp=true")
    assert raw == {"train": {"epochs": 5, "amp": True}, "threat": {"eps": "8/255"}}
    config = build_config(raw)
    assert config.train.epochs == 5 and config.threat.eps == pytest.approx(8 / 255)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["train.epochs"])


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 4\nmodel:\n  name: small_cnn\n")
    config = load_config(path, ["train.epochs=2"])
    assert config.train.epochs == 2 and config.model.name == "small_cnn"


def test_malformed_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
