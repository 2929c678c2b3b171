"""Client updates as Prefect tasks on a real local Ray cluster (2 workers): the local runner's metrics, and
no Prefect server of the workers' own."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from tests.conftest import prepare_run, processes_with_home, standalone_env, uninterrupted_metrics


def test_ray_runner_matches_the_local_runner(prefect_harness, tmp_path):
    from fedmef_core.config import parse_config
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=2)
    raw = config.model_dump(mode="json")
    # Ray gives each client num_cpus=1 intra-op thread; CPU kernels sum in a thread-count-dependent order,
    # so the flow and the reference run with the same single thread (then the results are equal bit for bit)
    raw["runtime"].update(runner="ray", workers=2, threads=1)
    raw["ray"] = {"address": None, "local_cpus": 2, "num_cpus": 1.0, "num_gpus": 0.0}
    ray_config = parse_config(raw)
    summary = train_flow(ray_config)
    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    on_ray = [(int(r.split(",")[0]), float(r.split(",")[1]), float(r.split(",")[2])) for r in rows]
    reference = uninterrupted_metrics(config.model_copy(update={"runtime": config.runtime.model_copy(
        update={"threads": 1})}))
    assert on_ray == reference
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["accuracy"] == summary["accuracy"]


def test_ray_workers_report_to_the_flows_temporary_server_instead_of_starting_their_own(tmp_path):
    """`python -m flows.train` with no Prefect server configured runs against a temporary server; the workers
    of its local Ray cluster are told its address, so no worker starts a temporary server of its own (each
    cost seconds of start-up and a share of a core, beside the flow's)."""
    from fedmef_core.config import parse_config

    _, config = prepare_run(tmp_path, rounds=2)
    raw = config.model_dump(mode="json")
    raw["runtime"].update(runner="ray", workers=2)
    raw["ray"] = {"address": None, "local_cpus": 2, "num_cpus": 1.0, "num_gpus": 0.0}
    (tmp_path / "params.yaml").write_text(parse_config(raw).to_yaml())
    home = tmp_path / "prefect-home"
    servers, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            servers.update(processes_with_home(home, running="prefect.server.api.server"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = subprocess.run([sys.executable, "-m", "flows.train", "--params", str(tmp_path / "params.yaml")],
                             cwd=tmp_path, env=standalone_env(home), capture_output=True, text=True, timeout=600)
    finally:
        done.set()
        watcher.join()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "round 2: clients" in run.stdout + run.stderr  # the waves ran (on Ray)
    assert len(servers) == 1, f"{len(servers)} Prefect servers were started: the flow's and one per Ray worker"
