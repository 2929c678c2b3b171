"""Train runs started as the Prefect UI starts them (a flow run of the served `train/fedmef` deployment, created
through the API): a missing partition is made, a user mistake is one line in the run's logs — no traceback."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL

from fedmef_core.config import parse_config
from fedmef_core.tiny import save_partition_of
from tasks.partitioning import partition_dataset
from tests.conftest import RERUN_PARTITION, tiny_raw
from tests.flows.test_deployments import _wait

ROOT = Path(__file__).resolve().parents[2]
PARTITION_FILES = ("clients.json", "stats.json", "partition.png")


@pytest.fixture(scope="module")
def served(prefect_harness, tmp_path_factory):
    """`flows.serve` in its own process, as `make serve` runs it; its deployments registered."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "params.yaml").write_text(parse_config(tiny_raw(folder)).to_yaml())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()}
    server = subprocess.Popen([sys.executable, "-m", "flows.serve", "--params", "params.yaml"], cwd=folder,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def registered():
        async with get_client() as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    return (await client.read_deployment_by_name("train/fedmef")).id
                except Exception:
                    assert server.poll() is None, "flows.serve exited"
                    assert time.monotonic() < deadline, "deployments not registered in 180 s"
                    await asyncio.sleep(1)

    try:
        yield asyncio.run(registered())
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_from_ui(deployment_id, form: dict):
    """A flow run of the deployment with this form, as the UI's "Run" creates it: (final flow run, its log
    records) once the run's last line ("Finished in state ...") has reached the server."""

    async def scenario():
        async with get_client() as client:
            flow_run = await client.create_flow_run_from_deployment(deployment_id, parameters={"config": form})
            finished = await _wait(client, flow_run.id)
            deadline = time.monotonic() + 60
            while True:  # the run's process sends its logs in batches
                logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
                                              limit=200, offset=0)
                if any(log.message.startswith("Finished in state") for log in logs) or time.monotonic() > deadline:
                    await asyncio.sleep(3)  # anything logged after it
                    return finished, await client.read_logs(
                        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200, offset=0)
                await asyncio.sleep(1)

    return asyncio.run(scenario())


def tracked_tiny(folder: Path):
    raw = tiny_raw(folder)
    raw["federation"]["rounds"] = 1
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "ui"}
    return parse_config(raw)


def test_ui_train_makes_the_partition_it_needs_as_the_partition_stage_would(served, tmp_path):
    config = tracked_tiny(tmp_path / "run")
    parts = Path(config.runtime.partitions_dir)
    assert not parts.exists()
    finished, logs = run_from_ui(served, config.as_params())
    assert finished.state.is_completed(), finished.state
    assert any(f"{parts} held no partition: made it" in log.message for log in logs), [log.message for log in logs]
    assert not any("Traceback" in log.message for log in logs)
    # the files `python -m flows.partition` writes (its task) for the same settings, byte for byte
    stage = config.model_copy(update={"runtime": config.runtime.model_copy(
        update={"partitions_dir": str(tmp_path / "stage")})})
    partition_dataset.fn(stage)
    for name in PARTITION_FILES:
        assert (parts / name).read_bytes() == (tmp_path / "stage" / name).read_bytes(), name
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()  # and it trained on it


def test_ui_user_mistake_fails_the_run_with_one_line_and_no_traceback(served, tmp_path):
    """The partition saved is seed 1's; the form asks for seed 7: refused as ever (never replaced), in one line."""
    config = tracked_tiny(tmp_path)
    save_partition_of(config)
    saved = (Path(config.runtime.partitions_dir) / "clients.json").read_bytes()
    form = config.as_params()
    form["partition"]["seed"] = 7  # what a user changes in the form
    finished, logs = run_from_ui(served, form)
    assert finished.state.is_failed(), finished.state
    reason = finished.state.message
    assert "made for partition.seed=1 but this run has partition.seed=7" in reason and "\n" not in reason
    assert re.search(RERUN_PARTITION, reason), reason
    messages = [log.message for log in logs]
    assert f"error: {reason}" in messages, messages
    assert not any("Traceback" in m or "\n" in m for m in messages), messages
    assert [log.message for log in logs if log.level >= 40] == [], messages  # no engine ERROR record
    assert (Path(config.runtime.partitions_dir) / "clients.json").read_bytes() == saved
    assert not (tmp_path / "checkpoints").exists()
