"""Deployments in a process work pool, run by a worker as on a GPU machine: a real `prefect server start`,
`python -m flows.deploy` and `prefect worker start` as a user types them, flow runs created through the API."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedmef_core.config import parse_config
from fedmef_core.runs import run_name
from flows.deployments import FLOWS
from tests.conftest import processes_with_home, save_partition_of, tiny_raw

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "gpu-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _stop(proc: subprocess.Popen, home: Path) -> None:
    """Stop a process started in its own session, then anything still running with its PREFECT_HOME (the
    flow-run processes a worker starts in process groups of their own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pid in processes_with_home(home):
        os.kill(pid, signal.SIGKILL)


def _env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port, its own PREFECT_HOME (sqlite there); yields the API URL."""
    folder = tmp_path_factory.mktemp("prefect-server")
    home, log = folder / "home", folder / "server.log"
    url = f"http://127.0.0.1:{(port := _free_port())}/api"
    with log.open("w") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                env=_env(home, None), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"prefect server exited ({proc.returncode}):\n{_tail(log)}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy in 120 s:\n{_tail(log)}"
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc, home)


def _experiment(tmp_path: Path):
    """A tiny tracked training whose run folder is relative: it lands in the folder the worker starts runs in."""
    raw = tiny_raw(tmp_path)
    raw["federation"]["rounds"] = 2
    raw["runtime"] = {"device": "cpu", "partitions_dir": str(tmp_path / "partitions")}
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "pool"}
    config = parse_config(raw)
    (tmp_path / "params.yaml").write_text(config.to_yaml())
    save_partition_of(config)
    return config


def test_a_worker_runs_a_deployed_training_within_the_pool_limit(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    config = _experiment(tmp_path)
    workdir, home = tmp_path / "work", tmp_path / "worker-home"
    deploy = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--pool", POOL, "--limit", "1", "--workdir", str(workdir)],
        cwd=tmp_path, env=_env(home, prefect_server), capture_output=True, text=True, timeout=240,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert f"serve it on each GPU machine: prefect worker start --pool {POOL} --limit 1" in deploy.stdout

    async def deployed_and_queued():
        async with get_client() as client:
            pool = await client.read_work_pool(POOL)
            deps = {name: await client.read_deployment_by_name(f"{name}/{POOL}") for name in FLOWS}
            first = await client.create_flow_run_from_deployment(
                deps["train"].id, parameters={"config": config.model_dump(mode="json")})
            later = datetime.now(UTC) + timedelta(seconds=3)  # after the training, inside the poll's window
            second = await client.create_flow_run_from_deployment(
                deps["partition"].id, parameters={"config": config.model_dump(mode="json")},
                state=Scheduled(scheduled_time=later))
            return pool, deps, first, second

    async def states(*ids):
        async with get_client() as client:
            return [(await client.read_flow_run(i)).state for i in ids]

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        pool, deps, train_run, queued_run = asyncio.run(deployed_and_queued())
    assert (pool.type, pool.concurrency_limit) == ("process", 1)
    for name, dep in deps.items():
        assert dep.work_pool_name == POOL and dep.entrypoint == f"{FLOWS[name].__module__}.{FLOWS[name].__name__}"
        assert dep.job_variables == {"working_dir": str(workdir)} and dep.enforce_parameter_schema

    # one poll, two scheduled runs: the pool's limit (1) hands out only the first, though the worker takes 2
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", "2", "--run-once"],
                                  cwd=tmp_path, env=_env(home, prefect_server), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        worker.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish its run in 300 s:\n{_tail(log)}")
    finally:
        _stop(worker, home)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        trained, queued = asyncio.run(states(train_run.id, queued_run.id))
    assert trained.is_completed(), f"train run ended {trained.type}: {trained.message}\nworker log:\n{_tail(log)}"
    assert queued.is_scheduled(), f"the pool limit let a second run through ({queued.type})\n{_tail(log)}"

    # the run's outputs are in the worker's folder, its MLflow run in the store the config names
    assert (workdir / "runs" / run_name(config) / "metrics" / "train.json").is_file(), _tail(log)
    mlflow = MlflowClient(config.tracking.mlflow_uri)
    experiment = mlflow.get_experiment_by_name("pool")
    runs = mlflow.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{train_run.id}'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["final_accuracy"] > 0.3


def test_deploy_refuses_a_pool_of_another_type(prefect_server, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import main

    (tmp_path / "params.yaml").write_text(parse_config(tiny_raw(tmp_path)).to_yaml())
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="containers", type="docker"))
        with pytest.raises(SystemExit) as stopped:
            main(["--pool", "containers", "--params", str(tmp_path / "params.yaml")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "work pool 'containers' exists but is of type 'docker'" in err and "Traceback" not in err


def test_deploy_without_a_server_is_one_line(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import main

    params = str(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(parse_config(tiny_raw(tmp_path)).to_yaml())
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as stopped:
        main(["--params", params])
    assert stopped.value.code == 2 and "start one (`prefect server start`) and set PREFECT_API_URL" in \
        capsys.readouterr().err
    nobody = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings({PREFECT_API_URL: nobody}), pytest.raises(SystemExit) as stopped:
        main(["--params", params])
    assert stopped.value.code == 2 and f"cannot reach the Prefect server at {nobody}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["--params", params, "--limit", "0"])
    assert stopped.value.code == 2 and "at least 1" in capsys.readouterr().err
