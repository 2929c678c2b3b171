"""Deployments as the Prefect UI uses them: a real (test) server, `flows.serve` in its own process,
flow runs created through the API with parameters."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL

from fedmef_core.config import parse_config
from flows.deployments import FLOWS, deployments
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[2]


async def _deployment_id(client, flow_name: str):
    return (await client.read_deployment_by_name(f"{flow_name}/fedmef")).id


async def _wait(client, flow_run_id, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        await asyncio.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def test_ui_form_schema_has_choices_and_help(prefect_harness):
    deps = deployments(parse_config({}))
    assert [d.flow_name for d in deps] == list(FLOWS)
    schema = deps[0]._parameter_openapi_schema.model_dump()  # what the server stores and the UI renders
    section = schema["definitions"]["PartitionConfig"]["properties"]
    assert section["scheme"]["enum"] == ["iid", "dirichlet", "shards"]  # a drop-down in the form
    assert section["alpha"]["description"]
    assert schema["definitions"]["FederationConfig"]["additionalProperties"] is False
    # one seed for the whole experiment: a number field on top; the section seeds default to null (follow it)
    assert schema["definitions"]["ExperimentConfig"]["properties"]["seed"]["type"] == "integer"
    assert {"type": "null"} in section["seed"]["anyOf"]
    form = deps[0].parameters["config"]
    assert form["seed"] == 0 and form["partition"]["seed"] is None and form["federation"]["seed"] is None
    form["seed"] = 4  # what a user changes in the form
    config = FLOWS["train"].validate_parameters({"config": form})["config"]
    assert (config.partition.seed, config.federation.seed) == (4, 4)


def test_ui_form_drop_downs_list_the_registered_methods_and_datasets(prefect_harness):
    """A method or dataset registered after the flows were imported is in the forms made afterwards."""
    from fedmef_core.algorithms import FederatedAlgorithm
    from fedmef_core.registry import DATASETS, METHODS, Dataset, register_dataset, register_method

    register_method("toy_form", FederatedAlgorithm)
    register_dataset("toy_images", Dataset(loader=lambda entry, root: None, channels=1, size=8, classes=2))
    try:
        deps = {d.flow_name: d for d in deployments(parse_config({}))}
        train = deps["train"]._parameter_openapi_schema.model_dump()["definitions"]
        assert train["PruningConfig"]["properties"]["method"]["enum"] == [*METHODS.names()]
        assert train["PruningConfig"]["properties"]["method"]["enum"][-1] == "toy_form"
        assert train["DataConfig"]["properties"]["name"]["enum"][-1] == "toy_images"
        sweep = deps["sweep"]._parameter_openapi_schema.model_dump()["definitions"]["SweepSpec"]["properties"]
        assert sweep["methods"]["items"]["enum"][-1] == "toy_form"
        form = deps["train"].parameters["config"]
        form["pruning"]["method"] = "toy_form"  # what a user picks in the form
        assert FLOWS["train"].validate_parameters({"config": form})["config"].pruning.method == "toy_form"
    finally:
        METHODS.remove("toy_form")
        DATASETS.remove("toy_images")
    assert "toy_form" not in deployments(parse_config({}))[0]._parameter_openapi_schema.model_dump()[
        "definitions"]["PruningConfig"]["properties"]["method"]["enum"]


def test_served_pipeline_runs_from_the_api_and_rejects_bad_parameters(prefect_harness, tmp_path):
    raw = tiny_raw(tmp_path)
    raw["federation"]["rounds"] = 2
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ui"}
    config = parse_config(raw)
    (tmp_path / "params.yaml").write_text(config.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()}
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--params", "params.yaml"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:

        async def scenario():
            async with get_client() as client:
                deadline = time.monotonic() + 120
                while True:  # the serve process registers its deployments
                    try:
                        dep_id = await _deployment_id(client, "pipeline")
                        break
                    except Exception:
                        assert server.poll() is None, "flows.serve exited"
                        assert time.monotonic() < deadline, "deployments not registered in 120 s"
                        await asyncio.sleep(1)
                bad = config.model_dump(mode="json")
                bad["partition"]["scheme"] = "zipf"
                with pytest.raises(PrefectHTTPStatusError, match="409"):
                    await client.create_flow_run_from_deployment(dep_id, parameters={"config": bad})
                extra = config.model_dump(mode="json")
                extra["federation"]["roundz"] = 3
                with pytest.raises(PrefectHTTPStatusError, match="409"):
                    await client.create_flow_run_from_deployment(dep_id, parameters={"config": extra})

                good = config.model_dump(mode="json")
                flow_run = await client.create_flow_run_from_deployment(dep_id, parameters={"config": good})
                finished = await _wait(client, flow_run.id)
                # the REST endpoint directly: Prefect 3.8.8's read_artifacts sends null filters its
                # own server refuses, and empty filter objects join on task runs (flow-level artifacts drop out)
                response = await client._client.post(
                    "/artifacts/filter", json={"limit": 200, "offset": 0, "sort": "CREATED_DESC"}
                )
                artifacts = response.json()
                return finished, artifacts

        finished, artifacts = asyncio.run(scenario())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert finished.state.is_completed(), finished.state
    mine = [a for a in artifacts if a["flow_run_id"] is not None]
    keys = {a["key"] for a in mine}
    assert {"run-summary", "training-progress"} <= keys
    progress = next(a for a in mine if a["key"] == "training-progress")  # newest first
    assert progress["data"] == 100
    summary = next(a for a in mine if a["key"] == "run-summary")
    assert "final test accuracy" in summary["data"] and "MLflow run" in summary["data"]
    assert (tmp_path / "metrics" / "eval.json").is_file()
