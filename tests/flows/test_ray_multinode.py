"""Client updates on an existing two-node Ray cluster, started as the README tells a user to (`ray start --head`,
then `ray start --address` for the second node, one token for all), with the train flow run as a user runs it
(`python -m flows.train`, `ray.address` set, one folder every node shares): the worker node is killed while it
trains a wave of clients, the wave is trained again on the head node, and the run ends Completed with the local
runner's metrics; a driver without the cluster's token gets one message."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import prepare_run, uninterrupted_metrics

REPO = Path(__file__).resolve().parents[2]

# `ray start` turns a node address of 127.0.0.1 into this machine's network address, so that other machines can
# reach it; both nodes are on this machine, so the test keeps every address on loopback (only that rewrite is
# switched off; the rest is Ray's own `ray start`).
RAY_START = (
    "import sys; from ray._private import services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)
DOOMED_ROUND = 2

# On the node to be killed only (its `PYTHONPATH`): every Ray worker, once a client of round DOOMED_ROUND has
# trained, says so in a marker file and holds its wave there until the node dies. The kill then lands mid-round
# for certain: the wave's Prefect task run exists, one of its clients is trained, the others are not.
HOLD_HOOK = """
import sys
if sys.argv[0].endswith("default_worker.py"):
    import importlib.abc, importlib.util, os, time

    def hold(clients):
        train_client = clients.train_client
        def held(config, broadcast, client_id):
            result = train_client(config, broadcast, client_id)
            if broadcast.round == {round}:
                with open({marker!r} + ".tmp", "w") as out:
                    out.write(str(client_id))
                os.replace({marker!r} + ".tmp", {marker!r})
                time.sleep(600)
            return result
        clients.train_client = held

    class HoldOnImport(importlib.abc.MetaPathFinder):  # patched once imported: the worker imports torch as usual
        def find_spec(self, name, path, target=None):
            if name != "tasks.clients":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                hold(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, HoldOnImport())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_node(args: list[str], env: dict[str, str], log: Path) -> Iterator[int]:
    """`ray start ARGS --block` in its own session (the node's raylet and workers are in it); yields the session
    id once the node is up; the whole session is killed afterwards, whatever happened."""
    base = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", "--block"]
    with open(log, "w") as out:
        node = subprocess.Popen([sys.executable, "-c", RAY_START, "start", *args, *base], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert node.poll() is None, f"ray start {args[0]} exited {node.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start {args[0]} is not up after 90 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield node.pid
    finally:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()


def session_processes(sid: int) -> dict[int, str]:
    """Live processes of session `sid`: pid -> command line (a Ray worker's is its process title)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found[int(entry.name)] = command
    return found


def kill_when_held(sid: int, marker: Path, flow: subprocess.Popen, timeout: float) -> None:
    """Once the node in session `sid` holds a wave (the marker is written), kill every process of the node
    (raylet, workers, agents: the node dies as a machine would)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert flow.poll() is None, f"the training ended before the worker node trained a round-{DOOMED_ROUND} client"
        assert time.monotonic() < deadline, f"the worker node trained no round-{DOOMED_ROUND} client"
        time.sleep(0.05)
    os.killpg(sid, signal.SIGKILL)
    while session_processes(sid):  # SIGKILL is delivered asynchronously
        assert time.monotonic() < deadline + 10, f"the worker node outlived SIGKILL: {session_processes(sid)}"
        time.sleep(0.05)


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # of a driver that has the cluster's token
    worker: int  # the session of the worker node's processes
    held: Path  # written by the worker node once it holds a round-DOOMED_ROUND wave


@pytest.fixture(scope="module")
def cluster(prefect_harness, tmp_path_factory) -> Iterator[Cluster]:
    """A head node, then a worker node (held in round DOOMED_ROUND), with one token; removed afterwards."""
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path_factory.mktemp("cluster")
    port = free_port()
    # every node and the flow: this checkout, the flow's Prefect server, one cluster token
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    hook, held = folder / "hook", folder / "held"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_HOOK.format(round=DOOMED_ROUND, marker=str(held)))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, temp, ignore_errors=True)
        stack.enter_context(ray_node(["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                                      f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"],
                                     env, folder / "head.log"))
        held_env = {**env, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
        worker = stack.enter_context(ray_node([f"--address=127.0.0.1:{port}"], held_env, folder / "worker.log"))
        # the flow connects to 127.0.0.1 as given (Ray's single-machine mode; the flow never starts a node)
        yield Cluster(f"127.0.0.1:{port}", {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, worker, held)


def ray_params(tmp_path: Path, address: str):
    """A tiny tracked experiment for the cluster: 2 waves of 3 clients a round, exchange in a shared folder."""
    from fedmef_core.config import parse_config

    _, config = prepare_run(tmp_path, rounds=3, clients_per_round=6)  # every client, every round
    # each client gets num_cpus=1 thread on Ray; the flow and the reference run with one too (see test_ray_runner)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"threads": 1})})
    raw = config.model_dump(mode="json")
    raw["runtime"].update(runner="ray", workers=2, client_retries=1, exchange_dir=str(tmp_path / "shared"))
    raw["ray"] = {"address": address, "num_cpus": 1.0, "num_gpus": 0.0}
    (tmp_path / "params.yaml").write_text(parse_config(raw).to_yaml())
    return config


def start_training(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m flows.train --params params.yaml` in `tmp_path`, its output in flow.log."""
    with open(tmp_path / "flow.log", "w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.train", "--params", str(tmp_path / "params.yaml")],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def training(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    flow = start_training(tmp_path, env)
    try:
        yield flow
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()


def mlflow_statuses(folder: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_a_driver_without_the_clusters_token_is_refused_with_one_message(cluster, tmp_path):
    """Ray 2.60 refuses a driver or node without the cluster's token (`InvalidAuthToken`); after Ray's 20 s of
    retries the flow says why, and what to set, in one message."""
    ray_params(tmp_path, cluster.address)
    without_token = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    with training(tmp_path, without_token) as flow:
        flow.wait(timeout=180)
    output = (tmp_path / "flow.log").read_text()
    assert flow.returncode == 2, output[-3000:]
    assert f"error: cannot connect to the Ray cluster at {cluster.address} (ray.address)" in output, output[-3000:]
    assert "set RAY_AUTH_MODE=token here" in output and "Traceback" not in output, output[-3000:]
    assert mlflow_statuses(tmp_path) == ["FAILED"]


def test_a_worker_node_killed_mid_round_loses_no_client(cluster, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    config = ray_params(tmp_path, cluster.address)
    with training(tmp_path, cluster.env) as flow:
        kill_when_held(cluster.worker, cluster.held, flow, timeout=120)
        flow.wait(timeout=180)
    output = (tmp_path / "flow.log").read_text()
    assert flow.returncode == 0, output[-5000:]
    assert re.search(r"Flow run '[^']+' - Finished in state Completed\(\)", output), output[-3000:]
    assert mlflow_statuses(tmp_path) == ["FINISHED"]

    # the wave on the dead node was lost as a whole, then trained again on the head (no client dropped)
    lost = re.findall(r"round (\d+): clients (\d+)-(\d+) lost \((\w+)", output)
    held = int(cluster.held.read_text())
    assert [(int(r), int(a) <= held <= int(b)) for r, a, b, _ in lost] == [(DOOMED_ROUND, True)], output[-5000:]
    assert lost[0][3] in ("NodeDiedError", "WorkerCrashedError"), output[-5000:]
    assert "dropped" not in output, output[-5000:]

    # the lost attempt's task run is marked Crashed (Prefect would show it Running for ever), the rest Completed
    flow_run = re.search(r"/flow-run/([0-9a-f-]{36})", output).group(1)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    assert sorted(r.state.type.value for r in runs) == ["COMPLETED"] * 6 + ["CRASHED"]  # 3 rounds of 2 waves

    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    on_ray = [(int(r.split(",")[0]), float(r.split(",")[1]), float(r.split(",")[2])) for r in rows]
    assert on_ray == uninterrupted_metrics(config)  # config: one thread, as each client on Ray
