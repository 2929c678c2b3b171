"""The pipeline flow, run for real under Prefect's test harness, tracked in a real sqlite MLflow store."""

import json

import pytest
from mlflow.tracking import MlflowClient

from fedmef_core.config import parse_config
from flows.pipeline import pipeline_flow
from tests.conftest import tiny_raw


@pytest.fixture
def tracked_config(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "flow-test"}
    raw["runtime"]["workers"] = 2
    return parse_config(raw)


def test_pipeline_flow_runs_partition_train_evaluate(prefect_harness, tracked_config, tmp_path):
    result = pipeline_flow(tracked_config)
    rt = tracked_config.runtime
    rounds = tracked_config.federation.rounds

    assert result["partition"]["num_clients"] == tracked_config.federation.num_clients
    clients = json.loads((tmp_path / "partitions" / "clients.json").read_text())["clients"]
    assert sum(len(c) for c in clients) == tracked_config.data.train_limit
    for name in ("accuracy.png", "confusion.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert (tmp_path / "partitions" / "partition.png").stat().st_size > 1000

    train = json.loads((tmp_path / "metrics" / "train.json").read_text())
    run_id = json.loads((tmp_path / "metrics" / "run.json").read_text())["mlflow_run_id"]
    evaluation = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert train["rounds"] == rounds
    assert evaluation["accuracy"] == pytest.approx(train["accuracy"])  # same final model, same test set
    assert 0.3 < evaluation["accuracy"] <= 1.0
    assert set(evaluation["per_class_accuracy"]) >= {"T-shirt/top", "Ankle boot"}
    csv_rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()
    assert csv_rows[0] == "round,accuracy,loss,train_loss,lr" and len(csv_rows) == rounds + 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == [
        "final.pt", *[f"round_{r:04d}.pt" for r in range(1, rounds + 1)]
    ]
    assert all(p.with_name(p.name + ".sha256").is_file() for p in (tmp_path / "checkpoints").glob("*.pt"))

    client = MlflowClient(tracked_config.tracking.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["federation.clients_per_round"] == "3"
    assert run.data.tags["prefect_flow_run_id"]
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in history] == list(range(1, rounds + 1))
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "rounds.csv", "plots", "checkpoints", "eval"} <= artifacts
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/partition.png", "plots/accuracy.png", "plots/confusion.png"} <= plots
    assert rt.workers == 2

    from flows.summary import summary_text

    (tmp_path / "params.yaml").write_text(tracked_config.to_yaml())
    text = summary_text(tracked_config)
    assert f"test accuracy {evaluation['accuracy']:.4f}" in text and run_id in text
    assert "accuracy.png, accuracy_adjustments.png, confusion.png, density.png, memory.png)" in text


def test_train_flow_runs_fedtiny_bn_selection_as_client_tasks(prefect_harness, tmp_path):
    """The setup exchange goes through the same client tasks as the rounds and is tracked at step 0."""
    from flows.train import train_flow
    from tests.conftest import prepare_run, uninterrupted_metrics

    _, config = prepare_run(tmp_path, rounds=2)
    raw = config.model_dump(mode="json")
    raw["pruning"] = {"method": "fedtiny", "bn_select": True, "bn_candidates": 3, "adjust_interval": 1,
                      "adjust_until": 2}
    config = parse_config(raw)
    summary = train_flow(config)
    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    assert [(int(r.split(",")[0]), float(r.split(",")[1]), float(r.split(",")[2])) for r in rows] == (
        uninterrupted_metrics(config)
    )
    client = MlflowClient(config.tracking.mlflow_uri)
    chosen = client.get_metric_history(summary["mlflow_run_id"], "bn_select/chosen")
    assert [m.step for m in chosen] == [0] and chosen[0].value in (0.0, 1.0, 2.0)
    losses = [client.get_metric_history(summary["mlflow_run_id"], f"bn_select/loss_{i}")[0].value for i in range(3)]
    assert min(losses) == losses[int(chosen[0].value)]
