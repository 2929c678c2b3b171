import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from fedmef_core.config import (
    ConfigError,
    ExperimentConfig,
    identity_of,
    load_config,
    parse_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def _model_defaults() -> dict:
    return {name: field.default.model_dump(mode="json") if isinstance(field.default, BaseModel) else field.default
            for name, field in ExperimentConfig.model_fields.items()}


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


def test_one_seed_drives_the_partition_and_federation_seeds_unless_they_are_set():
    default = parse_config({})
    assert (default.seed, default.partition.seed, default.federation.seed) == (0, 0, 0)
    one = parse_config({"seed": 5})
    assert (one.partition.seed, one.federation.seed) == (5, 5)
    assert load_config(ROOT / "params.yaml", {"seed": 5}) == one  # `--set seed=5`, as `dvc exp run -S seed=5`
    mixed = parse_config({"seed": 5, "federation": {"seed": 2}})
    assert (mixed.partition.seed, mixed.federation.seed) == (5, 2)  # an explicit seed is kept
    # params.yaml's spelling: a seed that follows the top-level one is written null, and reads back the same
    assert mixed.as_params()["partition"]["seed"] is None and mixed.as_params()["federation"]["seed"] == 2
    assert parse_config(mixed.as_params()) == mixed and parse_config(mixed.model_dump(mode="json")) == mixed
    assert parse_config(yaml.safe_load(one.to_yaml())) == one
    # the run folder and digest name the resolved seeds: the same experiment however it is spelled
    assert one.identity() == parse_config({"seed": 9, "partition": {"seed": 5}, "federation": {"seed": 5}}).identity()
    assert "seed" not in default.identity() and default.identity() != one.identity()
    older = {k: v for k, v in one.model_dump(mode="json").items() if k != "seed"}  # a checkpoint's config before
    assert identity_of(older) == one.identity()
    with pytest.raises(ConfigError) as err:
        parse_config({"seed": -1})
    assert str(err.value).count("\n") == 1 and "- seed: Input should be greater than or equal to 0" in str(err.value)


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


@pytest.mark.parametrize(
    "text, twice",
    [
        ("federation:\n  rounds: 2\ndata:\n  train_limit: 10\nfederation:\n  lr: 0.5\n",
         "'federation' is written twice (lines 1 and 5)"),
        ("federation:\n  rounds: 2\n  lr: 0.5\n  rounds: 3\n", "'rounds' is written twice (lines 2 and 4)"),
        ("federation: {rounds: 2, rounds: 3}\n", "'rounds' is written twice (line 1)"),
    ],
    ids=["section", "key", "flow-mapping"],
)
def test_a_section_or_key_written_twice_is_refused_not_silently_dropped(tmp_path, text, twice):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).startswith(f"{p}: not valid YAML: {twice}") and "\n" not in str(err.value)


def test_a_byte_that_is_not_utf8_is_one_message(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes(b"federation:\n  rounds: 2\n# caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == f"{p}: byte 0xe9 on line 3 is not UTF-8; save the file as UTF-8"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("runtime.run_dir=/tmp/my run #2", ("runtime.run_dir", "/tmp/my run #2")),  # YAML would cut at ' #'
        ("runtime.run_dir=#2", ("runtime.run_dir", "#2")),
        ("federation.lr=0.5 # half", ("federation.lr", "0.5 # half")),  # then refused as not a number
        ("runtime.run_dir='a #b'", ("runtime.run_dir", "a #b")),
        ("federation.rounds=5", ("federation.rounds", 5)),
        ("data.train_limit=null", ("data.train_limit", None)),
        ("x.y=[1, 2]", ("x.y", [1, 2])),
    ],
)
def test_a_hash_in_a_set_value_is_part_of_the_value(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["federation.lr=[x", "federation.lr={a: 1", "run.dir='open", "x.y={a: 1, a: 2}"])
def test_a_yaml_mistake_in_a_set_value_is_one_message(text):
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert str(err.value).startswith(f"--set {text!r}: not valid YAML: ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("federation.seed", -1), ("federation.seed", 2**64), ("partition.seed", -1), ("partition.seed", 2**70),
        ("federation.lr", float("inf")), ("federation.lr", float("nan")), ("federation.lr_final", float("inf")),
        ("federation.weight_decay", float("inf")), ("pruning.bae_lambda", float("nan")), ("ray.num_cpus", float("inf")),
    ],
)
def test_values_the_libraries_cannot_use_are_refused_at_validation(tmp_path, key, value):
    p = tmp_path / "p.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(p, {key: value})


def test_the_widest_seeds_the_libraries_take_are_accepted_and_work():
    import numpy as np
    import torch

    for seed in (0, 2**63, 2**64 - 1):
        config = parse_config({"federation": {"seed": seed}, "partition": {"seed": seed}})
        torch.manual_seed(config.federation.seed)
        np.random.default_rng([config.federation.seed, 1])
        np.random.default_rng(config.partition.seed)


@pytest.mark.parametrize("key", ["federation.rounds", "federation.lr", "runtime.threads", "seed", "devices.min_batch"])
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_where_a_number_is_meant_is_refused(tmp_path, key, value):
    """pydantic reads true as 1: `federation.rounds=true` trained one round."""
    p = tmp_path / "p.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{key}: expected a number, got {str(value).lower()} (a boolean)")):
        load_config(p, {key: value})
    assert load_config(p, {"data.cifar_shape": value}).data.cifar_shape is value  # a boolean setting still is one


def test_a_sweeps_numbers_are_numbers():
    from services.sweep import parse_spec

    for raw, key in (({"seeds": [0, True]}, "seeds"), ({"jobs": True}, "jobs"),
                     ({"densities": [float("nan")]}, "densities")):
        with pytest.raises(ConfigError, match=key):
            parse_spec({"methods": ["fedavg"], **raw})


PATH_SETTINGS = ["runtime.run_dir", "runtime.partitions_dir", "runtime.exchange_dir", "data.root", "devices.trace"]


@pytest.mark.parametrize("key", PATH_SETTINGS)
def test_paths_expand_home_and_variables_as_a_shell_does(tmp_path, monkeypatch, key):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDMEF_TEST_SCRATCH", str(tmp_path / "scratch"))
    section, name = key.split(".")
    for written, expected in (("~/x", tmp_path / "home" / "x"), ("$FEDMEF_TEST_SCRATCH/x", tmp_path / "scratch" / "x"),
                              ("${FEDMEF_TEST_SCRATCH}/x", tmp_path / "scratch" / "x"), ("rel/x", Path("rel/x"))):
        config = parse_config({section: {name: written}})
        assert getattr(getattr(config, section), name) == str(expected)


def test_the_sqlite_store_path_expands_and_an_unset_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FEDMEF_TEST_UNSET", raising=False)
    assert parse_config({"tracking": {"mlflow_uri": "sqlite:///~/m.db"}}).tracking.mlflow_uri == f"sqlite:///{tmp_path}/m.db"
    assert parse_config({"tracking": {"mlflow_uri": "sqlite:///mlflow.db"}}).tracking.mlflow_uri == "sqlite:///mlflow.db"
    for raw in ({"runtime": {"run_dir": "$FEDMEF_TEST_UNSET/x"}}, {"tracking": {"mlflow_uri": "sqlite:///$FEDMEF_TEST_UNSET/m.db"}}):
        with pytest.raises(ConfigError, match="environment variable FEDMEF_TEST_UNSET, which is not set"):
            parse_config(raw)


@pytest.mark.parametrize("raw, says", [
    ({"devices": {"tiers": [{"name": "big", "memory_mib": 1.7e308, "share": 1.0}]}}, "devices.tiers.0.memory_mib"),
    ({"devices": {"tiers": [{"name": "x" * 65, "memory_mib": 64, "share": 1.0}]}}, "devices.tiers.0.name"),
    ({"tracking": {"experiment": "E" * 501}}, "tracking.experiment"),
    ({"runtime": {"run_dir": "s\udcff"}}, "holds a byte that is not UTF-8"),
    ({"pruning": {"method": "fedavg", "density": True}}, "pruning.density"),
    ({"pruning": {"method": "fedavg", "density": -5}}, "pruning.density"),
], ids=["budget-overflows", "tier-name-long", "experiment-long", "path-not-utf8", "dense-density-bool",
        "dense-density-negative"])
def test_values_that_failed_late_or_passed_silently_are_refused_at_validation(raw, says):
    """A hostile probe's finds: a budget whose bytes overflow (every client failed), names MLflow refuses after
    training, a path that crashed Prefect, and a dense method's density accepted whatever it was."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_config(raw)
    assert parse_config({"pruning": {"method": "fedavg", "density": 0.3}}).pruning.density == 1.0


def test_a_sweep_path_with_a_byte_that_is_not_utf8_is_one_message():
    """`--root $'s\\xff'` crashed the sweep with a UnicodeEncodeError traceback when Prefect stored the request."""
    from services.sweep import parse_spec

    for key in ("root", "params"):
        with pytest.raises(ConfigError, match=f"{key}: .*holds a byte that is not UTF-8"):
            parse_spec({"methods": ["fedavg"], key: "s\udcff"})
