"""A real train flow with a tiered population of devices: devices/ metrics in MLflow, the per-client rows, the
Prefect table, the plot, and a resume that keeps the assignment."""

from __future__ import annotations

import asyncio
import csv

import pytest

from fedmef_core.checkpoint import round_checkpoint_path
from fedmef_core.config import parse_config
from tests.conftest import prepare_run, train_cli

TIERS = [{"name": "small", "memory_mib": 6.5, "share": 0.5}, {"name": "big", "memory_mib": 64, "share": 0.5}]


def _tiered(tmp_path, policy: str, rounds: int = 4):
    _, config = prepare_run(tmp_path, rounds=rounds)
    raw = config.model_dump(mode="json")
    raw["pruning"].update(method="fedmef", density=0.1, adjust_interval=2, adjust_until=2)
    raw["model"]["norm"], raw["sap"]["enabled"] = "auto", None
    raw["devices"] = {"profile": "tiers", "tiers": TIERS, "correlate": "labels", "policy": policy}
    return parse_config(raw)


def _artifacts() -> list[dict]:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            response = await client._client.post("/artifacts/filter", json={"limit": 50, "offset": 0,
                                                                            "sort": "CREATED_DESC"})
            return response.json()

    return asyncio.run(read())


def test_a_tiered_population_trains_within_its_budgets_and_reports_who_could(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.train import train_flow

    config = _tiered(tmp_path, "fit_batch")
    summary = train_flow(config)
    devices = summary["devices"]
    small, big = devices["tiers"]
    assert small["tier"] == "small" and small["fits"] and small["batch_size"] < 32 == big["batch_size"]
    assert small["trained"] == small["sampled"] > 0 and devices["over_budget"] == 0
    assert small["held_mib_max"] <= 6.5 and 0 < small["accuracy_on_its_data"] <= 1

    rows = list(csv.DictReader(open(tmp_path / "metrics" / "devices.csv")))
    assert len(rows) == config.federation.rounds * config.federation.clients_per_round
    assert {r["status"] for r in rows} == {"trained"}
    assert all(float(r["held_mib"]) <= float(r["budget_mib"]) for r in rows)
    assert all(int(r["batch_size"]) == small["batch_size"] for r in rows if r["tier"] == "small")
    assert (tmp_path / "plots" / "participation.png").stat().st_size > 0

    client = MlflowClient(config.tracking.mlflow_uri)
    run_id = summary["mlflow_run_id"]
    sampled = client.get_metric_history(run_id, "devices/small/sampled")
    assert sorted(m.step for m in sampled) == list(range(1, config.federation.rounds + 1))
    assert sum(m.value for m in sampled) == small["sampled"]
    assert client.get_metric_history(run_id, "devices/small/batch_size")[0].value == small["batch_size"]
    assert client.get_metric_history(run_id, "devices/participation")[0].value == 1.0
    logged = {a.path for a in client.list_artifacts(run_id, "devices")}
    assert logged == {"devices/devices.csv", "devices/devices.json"}

    table = [a for a in _artifacts() if a["key"] == "device-participation"]
    assert table and table[0]["type"] == "table" and "accuracy_on_its_data" in str(table[0]["data"])


def test_excluded_devices_are_counted_and_a_resume_keeps_the_assignment(prefect_harness, tmp_path):
    from flows.train import train_flow

    config = _tiered(tmp_path, "exclude")
    full = train_flow(config)
    small = full["devices"]["tiers"][0]
    assert not small["fits"] and small["trained"] == 0 and small["excluded"] == small["sampled"] > 0
    assert full["devices"]["participation"] < 1
    rows = (tmp_path / "metrics" / "devices.csv").read_text()

    # back to round 2 (a killed run), then again: the same assignment, the same rows, the same model
    for rnd in (3, 4):
        round_checkpoint_path(config.runtime.checkpoints_dir, rnd).unlink(missing_ok=True)
    (tmp_path / "checkpoints" / "final.pt").unlink()
    again = train_flow(config)
    assert again["rounds_run"] == 2  # rounds 3 and 4 again, from the round-2 checkpoint
    assert again["devices"]["assignment"] == full["devices"]["assignment"]
    assert (tmp_path / "metrics" / "devices.csv").read_text() == rows
    assert again["accuracy"] == full["accuracy"]


def test_a_bad_budget_trace_stops_the_cli_with_one_message(tmp_path, capsys):
    params, config = prepare_run(tmp_path, rounds=1)
    trace = tmp_path / "budgets.csv"
    trace.write_text("client_id,memory_mib\n0,64\n1,-3\n99,8\n")
    with pytest.raises(SystemExit) as exit_:
        train_cli(params, "devices.profile=trace", f"devices.trace={trace}")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "client 1 has budget -3" in err and "client 99 does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def _trace(path, budget_mib: float, clients: int) -> str:
    path.write_text("client_id,memory_mib\n" + "".join(f"{c},{budget_mib}\n" for c in range(clients)))
    return str(path)


RUN_FOLDER_PER_EXPERIMENT = ("runtime.run_dir=null", "runtime.checkpoints_dir=checkpoints",
                             "runtime.metrics_dir=metrics", "runtime.plots_dir=plots")


def test_an_edited_trace_is_another_experiment_in_another_run_folder(prefect_harness, tmp_path, monkeypatch):
    """The trace entered the identity by its path: editing it and training again overwrote the finished run."""
    params, config = prepare_run(tmp_path, rounds=1)
    monkeypatch.chdir(tmp_path)
    trace = _trace(tmp_path / "budgets.csv", 512, config.federation.num_clients)
    train_cli(params, *RUN_FOLDER_PER_EXPERIMENT, "devices.profile=trace", f"devices.trace={trace}")
    (first,) = (tmp_path / "runs").iterdir()
    kept = {p: p.read_bytes() for p in first.rglob("*") if p.is_file() and p.name != ".lock"}
    _trace(tmp_path / "budgets.csv", 256, config.federation.num_clients)  # the same path, other budgets
    train_cli(params, *RUN_FOLDER_PER_EXPERIMENT, "devices.profile=trace", f"devices.trace={trace}")
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert {p: p.read_bytes() for p in kept} == kept  # the first experiment's files, untouched
    # the same contents at another path are the same experiment: it finds its finished run
    moved = tmp_path / "moved.csv"
    moved.write_bytes((tmp_path / "budgets.csv").read_bytes())
    again = train_cli(params, *RUN_FOLDER_PER_EXPERIMENT, "devices.profile=trace", f"devices.trace={moved}")
    assert len(list((tmp_path / "runs").iterdir())) == 2 and again["rounds_run"] == 0


def test_a_refused_trace_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    params, config = prepare_run(tmp_path, rounds=1)
    monkeypatch.chdir(tmp_path)
    trace = tmp_path / "budgets.csv"
    trace.write_text("client_id,memory_mib\n0,64\n")
    with pytest.raises(SystemExit):
        train_cli(params, *RUN_FOLDER_PER_EXPERIMENT, "devices.profile=trace", f"devices.trace={trace}")
    assert "clients have no budget" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_run_without_devices_does_not_inherit_the_devices_files_of_the_folder(prefect_harness, tmp_path):
    params, config = prepare_run(tmp_path, rounds=1)
    trace = _trace(tmp_path / "budgets.csv", 512, config.federation.num_clients)
    train_cli(params, "devices.profile=trace", f"devices.trace={trace}")
    devices_files = [tmp_path / "metrics" / "devices.csv", tmp_path / "metrics" / "devices.json",
                     tmp_path / "plots" / "participation.png"]
    assert all(p.is_file() for p in devices_files)
    train_cli(params)  # another experiment in the same run folder, without devices
    assert (tmp_path / "metrics" / "train.json").is_file()
    assert not any(p.exists() for p in devices_files)


TINY_AND_BIG = "devices.tiers=[{name: tiny, memory_mib: 0.5, share: 0.8}, {name: big, memory_mib: 64, share: 0.2}]"
ONLY_TINY = "devices.tiers=[{name: tiny, memory_mib: 0.5, share: 1.0}]"
NO_CLIENT = "no client trained in any of the 3 rounds: every sampled client was excluded or over its memory budget"


def _mlflow_run(config):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking.mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, runs


def test_a_round_in_which_no_client_trained_says_so_and_the_training_goes_on(prefect_harness, tmp_path, capfd):
    # rounds 2 and 4 sample only devices too small to train (excluded); rounds 1 and 3 train the one big device
    params, config = prepare_run(tmp_path, rounds=4)
    summary = train_cli(params, "devices.profile=tiers", "devices.policy=exclude", TINY_AND_BIG)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "no client trained" in line]
    assert [line.split("round")[1].split()[0] for line in lines] == ["2/4", "4/4"]  # off a terminal too
    assert "Traceback" not in err and summary["rounds_run"] == 4 and summary["model_uri"]

    client, [run] = _mlflow_run(config)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "clients")] == [
        (1, 1), (2, 0), (3, 1), (4, 0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 3]
    assert [r["train_loss"] for r in csv.DictReader(open(tmp_path / "metrics" / "rounds.csv"))][1::2] == ["", ""]


def test_a_training_in_which_no_client_ever_trained_registers_nothing_and_fails_cleanly(prefect_harness, tmp_path,
                                                                                        capsys):
    from flows.evaluate import main as evaluate_cli

    params, config = prepare_run(tmp_path, rounds=3)
    only_tiny = ("devices.profile=tiers", "devices.policy=exclude", ONLY_TINY)
    with pytest.raises(SystemExit) as exit_:
        train_cli(params, *only_tiny)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and f"error: {NO_CLIENT}" in err and "no model is registered" in err
    assert "Traceback" not in out + err

    client, [run] = _mlflow_run(config)
    assert run.info.status == "FAILED" and NO_CLIENT in run.data.tags["mlflow.note.content"]
    clients = client.get_metric_history(run.info.run_id, "clients")
    assert [(m.step, m.value) for m in clients] == [(1, 0), (2, 0), (3, 0)]
    assert client.search_registered_models() == [] and client.search_model_versions() == []
    assert not (tmp_path / "metrics" / "train.json").exists()

    # a re-run does not take the untrained model for a finished training: it trains again, and fails the same way
    with pytest.raises(SystemExit) as again:
        train_cli(params, *only_tiny)
    out, err = capsys.readouterr()
    assert again.value.code == 2 and f"error: {NO_CLIENT}" in err and "already trained" not in out + err

    # nor does evaluate report its accuracy as a result
    argv = ["--params", str(params)] + [a for o in only_tiny for a in ("--set", o)]
    with pytest.raises(SystemExit) as evaluated:
        evaluate_cli(argv)
    err = capsys.readouterr().err
    assert evaluated.value.code == 2 and f"error: {NO_CLIENT}" in err and "there is nothing to evaluate" in err
    assert not (tmp_path / "metrics" / "eval.json").exists()
    client, runs = _mlflow_run(config)
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"] and client.search_model_versions() == []
