"""Experiments as isolated units: run folders, a lock, one source of defaults, rules checked before work."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import tasks.clients as clients
from fedmef_core.checkpoint import load_checkpoint
from fedmef_core.config import SEEDED_SECTIONS, ConfigError, ExperimentConfig, identity_of, parse_config
from fedmef_core.runs import RunBusy, run_lock, run_name, run_paths
from tests.conftest import prepare_run

ROOT = Path(__file__).resolve().parents[2]


def _own_folder(config: ExperimentConfig) -> ExperimentConfig:
    """The same experiment with the default run folder (runs/<name> under the working directory)."""
    raw = config.model_dump(mode="json")
    for key in ("run_dir", "checkpoints_dir", "metrics_dir", "plots_dir"):
        raw["runtime"].pop(key)
    return parse_config(raw)


def test_two_concurrent_trainings_keep_their_own_outputs(prefect_harness, tmp_path, monkeypatch):
    from flows.train import train_flow

    monkeypatch.chdir(tmp_path)
    _, base = prepare_run(tmp_path, rounds=2)
    configs = [_own_folder(base), _own_folder(base.model_copy(update={
        "federation": base.federation.model_copy(update={"seed": 7})}))]
    results, errors = {}, []

    def run(i: int) -> None:
        try:
            results[i] = train_flow(configs[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = MlflowClient(base.tracking.mlflow_uri)
    for i, config in enumerate(configs):
        paths = run_paths(config)
        assert paths.root == Path("runs") / run_name(config) and f"s{config.federation.seed}-" in paths.root.name
        final = load_checkpoint(paths.checkpoints / "final.pt")
        assert identity_of(final["config"]) == config.identity()  # no file of the other run
        for ckpt in paths.checkpoints.glob("round_*.pt"):
            assert identity_of(load_checkpoint(ckpt)["config"]) == config.identity()
        facts = json.loads((paths.metrics / "run.json").read_text())
        assert facts["mlflow_run_id"] == results[i]["mlflow_run_id"] and "mlflow_run_id" not in final["extra"]
        assert len((paths.metrics / "rounds.csv").read_text().splitlines()) == 1 + config.federation.rounds
        run = store.get_run(facts["mlflow_run_id"])
        assert run.info.run_name == run_name(config) and run.data.tags["seed"] == str(config.federation.seed)


def test_a_run_folder_in_use_is_refused_and_left_alone(prefect_harness, tmp_path):
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=1)
    paths = run_paths(config)
    with run_lock(paths):
        with pytest.raises(RunBusy, match="being written by another training.*runtime.run_dir"):
            train_flow(config)
    assert not paths.checkpoints.exists() and not paths.metrics.exists()
    train_flow(config)  # released: the folder is usable again
    assert (paths.checkpoints / "final.pt").is_file()


def test_a_failed_start_keeps_the_previous_good_checkpoints(prefect_harness, tmp_path, monkeypatch):
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=2)
    train_flow(config)
    paths = run_paths(config)
    before = sorted(p.name for p in paths.checkpoints.glob("*.pt"))

    def broken(*args, **kwargs):
        raise RuntimeError("device lost (injected)")

    monkeypatch.setattr(clients, "run_client", broken)
    changed = config.model_copy(update={"federation": config.federation.model_copy(update={"lr": 0.07})})
    with pytest.raises(clients.RoundFailedError):
        train_flow(changed)
    assert sorted(p.name for p in paths.checkpoints.glob("*.pt")) == before
    assert identity_of(load_checkpoint(paths.checkpoints / "final.pt")["config"]) == config.identity()


def test_a_partial_parameter_dict_runs_params_yaml_values():
    from flows.train import train_flow

    validated = train_flow.validate_parameters({"config": {"federation": {"rounds": 2}}})["config"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["federation"]["rounds"] = 2
    assert validated == parse_config(params)


def test_a_rule_across_fields_is_refused_before_any_work(prefect_harness, tmp_path):
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=1)
    raw = config.model_dump(mode="json")
    raw["federation"].update(clients_per_round=20, num_clients=6)
    bad = ExperimentConfig.model_validate(raw)  # what Prefect's parameter validation lets through
    state = train_flow(bad, return_state=True)
    assert state.is_failed()
    assert state.message.count("\n") == 1 and "Traceback" not in state.message
    assert "federation.clients_per_round (20) cannot exceed federation.num_clients (6)" in state.message
    assert not run_paths(bad).root.joinpath("checkpoints").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened


def test_dvc_stages_declare_every_section_that_changes_their_results():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    sections = set(ExperimentConfig.model_fields)
    assert set(stages["train"]["params"]) == sections  # a new config section cannot be forgotten
    identity = set(identity_of(dict.fromkeys(sections)))
    assert identity <= set(stages["evaluate"]["params"])  # evaluate checks the checkpoint's identity
    assert stages["train"]["cmd"].endswith("--set runtime.run_dir=.")  # the pipeline's fixed output paths
    for name, stage in stages.items():  # a section seed left null follows the top-level seed: depend on both
        if any(p in SEEDED_SECTIONS or p.removesuffix(".seed") in SEEDED_SECTIONS for p in stage["params"]):
            assert "seed" in stage["params"], f"stage {name} uses a section seed but not the top-level seed"
    assert "seed" in stages["partition"]["params"]


RELATIVE_OUTPUTS = [f"runtime.{key}={key[:-4]}" for key in ("checkpoints_dir", "metrics_dir", "plots_dir")]


@pytest.mark.parametrize("setting", ["checkpoints_dir", "metrics_dir", "plots_dir"])
def test_an_output_folder_outside_the_run_folder_is_refused(tmp_path, capsys, setting):
    """Two trainings (seeds 3 and 7) given the same absolute folder outside their run folders: each run lock
    covered only its own run folder, so both wrote there and the second's model replaced the first's."""
    from tests.conftest import train_cli

    params, _ = prepare_run(tmp_path, rounds=1)
    shared = tmp_path / "shared"
    for seed in (3, 7):
        with pytest.raises(SystemExit) as ended:
            train_cli(params, f"runtime.run_dir={tmp_path / f'run-{seed}'}", f"federation.seed={seed}",
                      *RELATIVE_OUTPUTS, f"runtime.{setting}={shared}")
        err = capsys.readouterr().err
        assert ended.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        run_dir = tmp_path / f"run-{seed}"
        assert err.startswith(f"error: runtime.{setting} ({shared}) is outside the run folder {run_dir}")
    assert not shared.exists() and not (tmp_path / "mlflow.db").exists()
    for escaping in ("../elsewhere", str(tmp_path / "run-3" / ".." / "x")):
        with pytest.raises(ConfigError, match="outside the run folder"):
            run_paths(parse_config({"runtime": {setting: escaping}}))
    inside = parse_config({"runtime": {"run_dir": str(tmp_path / "r"), setting: str(tmp_path / "r" / "deep" / "x")}})
    assert getattr(run_paths(inside), setting.removesuffix("_dir")) == tmp_path / "r" / "deep" / "x"
