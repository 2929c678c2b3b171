"""Production faults, caused for real: SIGKILL mid-run, a client that raises, a NaN loss."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tasks.clients as clients
from fedmef_core.engine import Server
from tests.conftest import prepare_run, uninterrupted_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_sigkill_mid_run_then_restart_gives_the_uninterrupted_metrics(tmp_path):
    params, config = prepare_run(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    cmd = [sys.executable, "-m", "flows.train", "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = Path(config.runtime.checkpoints_dir) / "round_0002.pt.sha256"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    memory_at_start = (tmp_path / "metrics" / "memory.json").read_bytes()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(config.runtime.checkpoints_dir) / "final.pt").exists()

    restarted = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming from round" in restarted.stdout + restarted.stderr

    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    resumed = [(int(r.split(",")[0]), float(r.split(",")[1]), float(r.split(",")[2])) for r in rows]
    assert resumed == uninterrupted_metrics(config)  # bit for bit on CPU
    assert (tmp_path / "metrics" / "memory.json").read_bytes() == memory_at_start  # measured on the initial model

    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # continued, not forked
    run_json = json.loads((tmp_path / "metrics" / "run.json").read_text())  # what names the checkpoints' run
    assert run_json["mlflow_run_id"] == runs[0].info.run_id and run_json["rounds_run"] < config.federation.rounds
    # every round once: metrics held back for a batched send went out before the checkpoint the kill left
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(logged) == list(range(1, config.federation.rounds + 1))


@pytest.fixture
def flaky_client(monkeypatch):
    """Make chosen clients raise (a fault we cannot cause on CPU, e.g. CUDA out-of-memory)."""
    calls: dict[tuple[int, int], int] = {}  # (round, client) -> attempts
    real = clients.run_client

    def run_client(config, broadcast, client_id, *args, **kwargs):
        key = (broadcast.round, client_id)
        calls[key] = calls.get(key, 0) + 1
        if client_id in flaky_client.fail_always or (client_id in flaky_client.fail_once and calls[key] == 1):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(config, broadcast, client_id, *args, **kwargs)

    flaky_client.fail_always, flaky_client.fail_once, flaky_client.calls = set(), set(), calls
    monkeypatch.setattr(clients, "run_client", run_client)
    return flaky_client


def test_failing_client_is_retried_then_dropped(prefect_harness, tmp_path, flaky_client):
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=2, clients_per_round=3, min_clients=2)
    picked = Server.sample_clients  # the clients of round 1 are deterministic
    server_like = type("S", (), {"config": config})()
    r1 = picked(server_like, 1)
    flaky_client.fail_once = {r1[0]}
    flaky_client.fail_always = {r1[1]}
    train_flow(config)
    assert flaky_client.calls[(1, r1[0])] == 2  # failed once, retried, succeeded
    assert flaky_client.calls[(1, r1[1])] == 1 + config.runtime.client_retries  # then dropped
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "metrics" / "run.json").read_text())["mlflow_run_id"]
    dropped = MlflowClient(config.tracking.mlflow_uri).get_metric_history(run_id, "dropped_clients")
    assert (dropped[0].step, dropped[0].value) == (1, 1)
    assert MlflowClient(config.tracking.mlflow_uri).get_metric_history(run_id, "clients")[0].value == 2


def test_too_few_clients_stop_the_run_and_keep_the_last_checkpoint(prefect_harness, tmp_path, flaky_client):
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=3, clients_per_round=3, min_clients=3)
    server_like = type("S", (), {"config": config})()
    flaky_client.fail_always = {Server.sample_clients(server_like, 2)[0]}
    with pytest.raises(clients.RoundFailedError, match="min_clients is 3"):
        train_flow(config)
    ckpts = sorted(p.name for p in Path(config.runtime.checkpoints_dir).glob("round_*.pt"))
    assert ckpts == ["round_0001.pt"]


def test_nan_loss_stops_the_run_without_retrying(prefect_harness, tmp_path):
    from fedmef_core.client import NonFiniteLossError
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=2, lr=1e6, lr_final=1e6)
    with pytest.raises(NonFiniteLossError, match="lower federation.lr"):
        train_flow(config)
    assert not (Path(config.runtime.checkpoints_dir) / "final.pt").exists()


def test_checkpoints_that_pass_their_checksum_but_lie_are_skipped_on_resume_and_refused_by_evaluate(
        prefect_harness, tmp_path, capsys, caplog):
    """Round 3 holds weights of another shape, round 2 another dict, both with matching `.sha256` files: the
    resume reports and skips both and continues from round 1 to the uninterrupted metrics; evaluate refuses a
    final.pt that lies with one message."""
    import flows.cli
    from fedmef_core.checkpoint import load_checkpoint, round_checkpoint_path, save_checkpoint
    from flows.evaluate import evaluate_flow
    from tasks import preflight
    from tests.conftest import train_cli

    params, config = prepare_run(tmp_path, rounds=3)
    train_cli(params)
    folder = Path(config.runtime.checkpoints_dir)
    third = load_checkpoint(round_checkpoint_path(folder, 3))
    name = next(iter(third["model"]))
    save_checkpoint(round_checkpoint_path(folder, 3), {**third, "model": {**third["model"], name: torch.zeros(2, 2)}})
    save_checkpoint(round_checkpoint_path(folder, 2), {"weights": "someone else's"})
    (folder / "final.pt").unlink()
    capsys.readouterr()

    summary = train_cli(params)
    out = "".join(capsys.readouterr()) + caplog.text  # the flow's prints go to Prefect's log too
    assert "resuming from round 1" in out and summary["rounds"] == 3
    assert re.search(r"checkpoint skipped: \S+round_0003.pt: passes its checksum but holds weights of another "
                     rf"shape \(model weight '{re.escape(name)}' is torch.float32 \(2, 2\)", out), out
    assert re.search(r"checkpoint skipped: \S+round_0002.pt: passes its checksum but is not a checkpoint", out), out
    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    assert [(int(r.split(",")[0]), float(r.split(",")[1]), float(r.split(",")[2])) for r in rows] == \
        uninterrupted_metrics(config)

    final = load_checkpoint(folder / "final.pt")
    save_checkpoint(folder / "final.pt", {**final, "model": {**final["model"], name: torch.zeros(2, 2)}})
    with pytest.raises(SystemExit) as ended:
        flows.cli.main(evaluate_flow, preflight.for_evaluate, argv=["--params", str(params)])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {folder / 'final.pt'}: passes its checksum but holds weights of another shape")
    assert not (tmp_path / "metrics" / "eval.json").exists()


def test_a_finished_training_run_again_trains_nothing_and_rewrites_nothing(prefect_harness, tmp_path, capsys,
                                                                           caplog):
    from mlflow.tracking import MlflowClient

    from tests.conftest import train_cli

    params, config = prepare_run(tmp_path, rounds=2)
    first = train_cli(params)
    written = {p: p.read_bytes() for p in tmp_path.glob("*/*") if p.is_file() and "mlflow" not in p.name}
    capsys.readouterr()
    again = train_cli(params)
    said = "".join(capsys.readouterr()) + caplog.text
    assert "all 2 rounds were already trained" in said and "trained rounds 3-2" not in said
    assert again["rounds_run"] == 0 and again["accuracy"] == first["accuracy"]
    assert {p: p.read_bytes() for p in written} == written  # train.json, run.json, checkpoints, plots: as they were
    assert json.loads((tmp_path / "metrics" / "run.json").read_text())["rounds_run"] == 2
    client = MlflowClient(config.tracking.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == first["mlflow_run_id"]
