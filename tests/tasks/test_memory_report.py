import json

from mlflow.tracking import MlflowClient

from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset
from fedmef_core.device import resolve_device
from fedmef_core.models import build_model
from fedmef_core.runs import run_paths
from services.tracking.tracker import Tracker
from tasks.memory import client_step_report, log_memory_report
from tests.conftest import tiny_raw


def test_memory_report_is_logged_to_mlflow_json_and_png(tmp_path):
    raw = tiny_raw(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["tracking"] = {"enabled": True, "mlflow_uri": uri, "experiment": "mem"}
    raw["model"] = {"arch": "cnn", "norm": "nsconv"}
    raw["sap"] = {"enabled": True, "positions": "bitmap", "relu_bitmask": True}
    config = parse_config(raw)
    train, _ = load_dataset(config.data)
    model = build_model(config.model, train.images.shape[1], train.num_classes, train.images.shape[-1])
    tracker = Tracker(config.tracking)
    run_id = tracker.start(config, run_name="mem")
    report = client_step_report(config, model, train, resolve_device("cpu"))
    log_memory_report(config, report, run_paths(config), tracker)
    tracker.end()

    saved = json.loads((tmp_path / "metrics" / "memory.json").read_text())
    assert saved["activation_bytes"] == report.activation_bytes > 0
    assert saved["footprint_bytes"] == report.weights_bytes + report.activation_bytes
    assert saved["batch_size"] == config.federation.batch_size
    assert (tmp_path / "plots" / "memory.png").stat().st_size > 1000
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["memory/activations_mib"] == report.activation_bytes / 2**20
    assert {"memory/weights_mib", "memory/footprint_mib", "memory/total_mib"} <= set(metrics)
    artifacts = [f.path for f in MlflowClient(uri).list_artifacts(run_id)]
    assert "memory.json" in artifacts and "plots" in artifacts
    assert all(p.grad is None for p in model.parameters())  # the global model is untouched


def test_memory_table_artifact_inside_a_flow_run(prefect_harness, tmp_path):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.memory import _prefect_table

    config = parse_config(tiny_raw(tmp_path))
    train, _ = load_dataset(config.data)
    model = build_model(config.model, train.images.shape[1], train.num_classes, train.images.shape[-1])
    from tasks.memory import client_step_report

    report = client_step_report(config, model, train, resolve_device("cpu"))
    _prefect_table(report, config)  # outside a run: silently nothing

    @flow
    def memory_flow():
        _prefect_table(report, config)

    memory_flow()

    async def artifacts():
        async with get_client() as client:
            response = await client._client.post(
                "/artifacts/filter", json={"limit": 50, "offset": 0, "sort": "CREATED_DESC"}
            )
            return response.json()

    mine = [a for a in asyncio.run(artifacts()) if a["key"] == "memory-report"]
    assert mine and mine[0]["type"] == "table"
    assert "activations" in str(mine[0]["data"]) and str(report.activation_bytes) in str(mine[0]["data"])
