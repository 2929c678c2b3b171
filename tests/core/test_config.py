from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fedmef_core.config import ConfigError, ExperimentConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def _model_defaults() -> dict:
    return {name: field.default.model_dump(mode="json") for name, field in ExperimentConfig.model_fields.items()}


def test_params_yaml_is_the_config_models_defaults():
    """One source of defaults: every key spelled out in params.yaml, each equal to the model's default."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw == _model_defaults()


def test_empty_and_partial_configs_fill_from_params_yaml():
    full = load_config(ROOT / "params.yaml")
    assert ExperimentConfig() == full and parse_config({}) == full and parse_config(None) == full
    partial = parse_config({"federation": {"rounds": 3}})
    assert partial.federation.rounds == 3
    assert partial.federation.model_dump(exclude={"rounds"}) == full.federation.model_dump(exclude={"rounds"})
    assert partial.model_dump(exclude={"federation"}) == full.model_dump(exclude={"federation"})


def test_auto_settings_resolve_to_what_the_method_runs():
    fedmef = parse_config({"pruning": {"method": "fedmef"}})
    assert (fedmef.model.norm, fedmef.sap.enabled) == ("nsconv", True)  # the paper's method
    tiny = parse_config({"pruning": {"method": "fedtiny", "density": 0.2}})
    assert (tiny.model.norm, tiny.sap.enabled, tiny.pruning.density) == ("batch", False, 0.2)
    dense = parse_config({"pruning": {"method": "fedavg", "density": 0.2}})
    assert (dense.model.norm, dense.sap.enabled, dense.pruning.density) == ("batch", False, 1.0)
    ablation = parse_config({"pruning": {"method": "fedmef"}, "model": {"norm": "batch"}, "sap": {"enabled": False}})
    assert (ablation.model.norm, ablation.sap.enabled) == ("batch", False)  # explicit choices are kept
    assert parse_config(fedmef.model_dump(mode="json")) == fedmef  # resolved configs round-trip


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(FIXTURES / "invalid_unknown_key.yaml")
    assert "federation.roundz: unknown key" in str(err.value)


def test_bad_values_name_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(FIXTURES / "invalid_values.yaml")
    msg = str(err.value)
    assert "partition.scheme" in msg and "'zipf'" in msg and "'dirichlet'" in msg
    assert "partition.alpha" in msg and "-1" in msg
    assert "federation.clients_per_round (10) cannot exceed federation.num_clients (5)" in msg
    assert "Traceback" not in msg


def test_config_is_frozen_and_flattens():
    config = ExperimentConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.federation.rounds = 3  # type: ignore[misc]
    flat = config.flat()
    assert flat["federation.rounds"] == config.federation.rounds
    assert flat["tracking.mlflow_uri"] == "sqlite:///mlflow.db"


def test_overrides_are_validated(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("federation:\n  rounds: 2\n")
    assert load_config(p, {"federation.rounds": 7}).federation.rounds == 7
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(p, {"federation.rounds": 0})
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, {"rounds": 3})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config([1, 2])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "federation:\n"])
def test_overrides_on_an_empty_file_or_section(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    assert load_config(p, {"federation.rounds": 7}).federation.rounds == 7


@pytest.mark.parametrize("text", ["- federation\n- data\n", "42\n", "just a sentence\n"])
def test_a_file_that_is_not_a_mapping_is_one_clear_message(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    for overrides in (None, {"federation.rounds": 7}):
        with pytest.raises(ConfigError, match=f"{p}: expected a mapping of sections"):
            load_config(p, overrides)
