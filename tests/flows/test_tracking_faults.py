"""Outside failures around tracking, caused for real: a real `mlflow server` that dies mid-run, credentials in
the tracking URI, output folders that cannot be written. Each ends with one clear message, nothing lost, and
no MLflow run left RUNNING."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import flows.cli
from flows.partition import partition_flow
from tasks import preflight
from tasks.outputs import RoundReporter
from tests.conftest import prepare_run, train_cli

SECRET = "s3cret-Pa55"


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store in `folder`; `kill()` ends it like a crash."""

    def __init__(self, folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.folder = folder
        self.start()

    def start(self) -> None:
        """Start (or restart, on the same store and port) and wait until it answers."""
        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300  # a loaded machine: ~40-90 s
        while True:
            assert self.proc.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not start"
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
            self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.kill()


def test_a_tracking_outage_mid_run_does_not_stop_training(prefect_harness, tmp_path, mlflow_server, monkeypatch,
                                                          capfd, caplog):
    params, config = prepare_run(tmp_path, rounds=4)
    killed_at = []
    report = RoundReporter.__call__

    def report_then_kill_the_server_after_round_1(self, server, rnd, metrics):
        report(self, server, rnd, metrics)
        if rnd == 1:
            self.tracker.flush()  # metrics go in batches every few seconds: the store holds round 1 before it dies
            mlflow_server.kill()
            killed_at.append(time.perf_counter())

    monkeypatch.setattr(RoundReporter, "__call__", report_then_kill_the_server_after_round_1)
    summary = train_cli(params, f"tracking.mlflow_uri={mlflow_server.uri}")
    seconds_after_the_outage = time.perf_counter() - killed_at[0]

    assert summary["rounds"] == 4 and summary["mlflow_run_id"]
    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / "metrics" / "train.json").exists() and (tmp_path / "checkpoints" / "final.pt").exists()
    assert seconds_after_the_outage < 60  # MLflow's own retries: ~8 minutes, then a traceback
    out, err = capfd.readouterr()  # what Prefect's console handler shows comes from the log records
    printed = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or "warning" in r.getMessage()]
    assert len(printed) == 2, printed  # the outage, once (no line per retry); at the end, what was not logged
    assert "failed (" in printed[0] and "training goes on" in printed[0]
    assert "still unreachable" in printed[1] and "metrics of steps 2, 3, 4" in printed[1]
    assert "its end (FINISHED: the store shows it RUNNING)" in printed[1]
    assert "Traceback" not in out + err + caplog.text


def test_what_an_outage_held_back_is_sent_once_the_server_is_back(tmp_path, mlflow_server, capsys):
    from fedmef_core.config import ExperimentConfig, TrackingConfig
    from services.tracking.tracker import Tracker

    config = ExperimentConfig(tracking=TrackingConfig(mlflow_uri=mlflow_server.uri, experiment="t"))
    tracker = Tracker(config.tracking)
    run_id = tracker.start(config, run_name="r")
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    mlflow_server.kill()
    note = tmp_path / "note.txt"
    note.write_text("hi")
    tracker.log_metrics({"train_loss": 0.5}, step=2)
    tracker.log_artifact(note, "notes")
    assert tracker.offline and len(tracker.pending) == 2
    mlflow_server.start()
    tracker.log_metrics({"train_loss": 0.25}, step=3)
    tracker.end()

    client = MlflowClient(mlflow_server.uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.25)]
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert client.get_run(run_id).info.status == "FINISHED"
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and f"{mlflow_server.uri} is back: run {run_id} caught up" in out


def test_credentials_in_the_uri_reach_the_server_and_are_stored_nowhere(prefect_harness, tmp_path, mlflow_server,
                                                                        monkeypatch, capfd):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # unset now, restored after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    params, config = prepare_run(tmp_path, rounds=2)
    uri = mlflow_server.uri.replace("http://", f"http://ann:{SECRET}@")
    summary = train_cli(params, f"tracking.mlflow_uri={uri}")

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.mlflow_uri"] == mlflow_server.uri
    assert not [v for v in [*run.data.params.values(), *run.data.tags.values()] if SECRET in v]
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert mlflow_server.uri in config_yaml.read_text() and SECRET not in config_yaml.read_text()
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert checkpoints
    for path in checkpoints:
        assert SECRET.encode() not in path.read_bytes()
        assert SECRET not in repr(torch.load(path, map_location="cpu", weights_only=False)["config"])
    out, err = capfd.readouterr()
    assert SECRET not in out + err


@pytest.mark.parametrize("setting", ["metrics_dir", "plots_dir", "checkpoints_dir", "exchange_dir", "run_dir"])
def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, setting):
    params, config = prepare_run(tmp_path, rounds=2)
    (tmp_path / "a-file").write_text("")  # no folder can be made under a file (not even by root)
    unwritable = "/proc/fedmef" if setting in ("exchange_dir", "run_dir") else str(tmp_path / "a-file" / "out")
    inside = [f"runtime.{key}={key}" for key in ("checkpoints_dir", "metrics_dir", "plots_dir")]  # of run_dir
    with pytest.raises(SystemExit) as ended:
        train_cli(params, *inside, f"runtime.{setting}={unwritable}")
    err = capsys.readouterr().err
    assert ended.value.code == 2
    assert err.startswith(f"error: runtime.{setting}: cannot write to {unwritable}") and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(config.tracking.mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(config.tracking.mlflow_uri).search_experiments()])


def test_an_unwritable_partitions_folder_is_refused_before_any_work(tmp_path, capsys):
    params, _ = prepare_run(tmp_path)
    with pytest.raises(SystemExit) as ended:
        flows.cli.main(partition_flow, preflight.for_partition,
                       argv=["--params", str(params), "--set", "runtime.partitions_dir=/proc/fedmef"])
    assert ended.value.code == 2
    assert capsys.readouterr().err.startswith("error: runtime.partitions_dir: cannot write to /proc/fedmef")


def test_a_full_disk_mid_run_is_one_message_and_keeps_the_last_good_checkpoint(prefect_harness, tmp_path, capsys,
                                                                                small_disk):
    """The run folder on a real 3 MB tmpfs: round 1's checkpoint (1.7 MB) fits, round 2's does not."""
    from fedmef_core.checkpoint import load_checkpoint

    params, config = prepare_run(tmp_path, rounds=3)
    disk = small_disk(3)
    inside = [f"runtime.{key}={key[:-4]}" for key in ("checkpoints_dir", "metrics_dir", "plots_dir")]
    with pytest.raises(SystemExit) as ended:
        train_cli(params, f"runtime.run_dir={disk}", *inside)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if "error" in line.lower()]  # (MLflow's INFO lines: a new store)
    assert line.startswith(f"error: cannot write {disk / 'checkpoints' / 'round_0002.pt'}: no space left on device")
    assert load_checkpoint(disk / "checkpoints" / "round_0001.pt")["round"] == 1  # the last good one, whole
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("round_0002")]
    client = MlflowClient(config.tracking.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FAILED"


def _one_error_line(capfd) -> str:
    """The one `error:` line the CLI printed; no traceback anywhere (MLflow's own logger included)."""
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ERROR mlflow" not in out + err, (out + err)[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def _valid_store(path: Path) -> None:
    """A real MLflow sqlite store with one experiment, made by MLflow itself."""
    MlflowClient(f"sqlite:///{path}").create_experiment("other")


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_a_damaged_store_is_one_message_before_any_work(tmp_path, capfd, damage):
    params, config = prepare_run(tmp_path, rounds=2)
    db = tmp_path / "mlflow.db"
    if damage == "random-bytes":
        db.write_bytes(os.urandom(20_000))
    else:
        _valid_store(db)
        db.write_bytes(db.read_bytes()[:30_000])
    with pytest.raises(SystemExit) as ended:
        train_cli(params)
    assert ended.value.code == 2
    line = _one_error_line(capfd)
    assert line.startswith(f"error: MLflow tracking store {config.tracking.mlflow_uri} is damaged (")
    assert f"move {db} aside" in line
    assert not list(tmp_path.glob("checkpoints/*"))


def test_a_read_only_store_is_one_message_before_any_work(tmp_path, capfd, small_disk):
    """The store on a real read-only file system: MLflow reads it, and its first write (the run) failed with
    eight tracebacks once the training had started."""
    import subprocess

    _valid_store(tmp_path / "made.db")
    disk = small_disk(5)
    shutil.copy(tmp_path / "made.db", disk / "mlflow.db")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    params, config = prepare_run(tmp_path, rounds=2)
    with pytest.raises(SystemExit) as ended:
        train_cli(params, f"tracking.mlflow_uri=sqlite:///{disk / 'mlflow.db'}")
    assert ended.value.code == 2
    line = _one_error_line(capfd)
    assert line.startswith(f"error: MLflow tracking store sqlite:///{disk / 'mlflow.db'} cannot be written (")
    assert "make " in line and "writable, or set tracking.mlflow_uri" in line
    assert not list(tmp_path.glob("checkpoints/*"))


def test_an_experiment_deleted_in_the_ui_is_one_message_that_says_how_to_restore_it(prefect_harness, tmp_path,
                                                                                    capfd):
    params, config = prepare_run(tmp_path, rounds=1)
    client = MlflowClient(config.tracking.mlflow_uri)
    client.delete_experiment(client.create_experiment("resume"))
    with pytest.raises(SystemExit) as ended:
        train_cli(params)
    assert ended.value.code == 2
    line = _one_error_line(capfd)
    assert line.startswith("error: MLflow experiment 'resume' was deleted") and "set tracking.experiment" in line
    command = line.split("`")[1]  # the way on it gives, run as given
    env = {**os.environ, **dict([command.split(" ")[0].split("=", 1)])}
    restored = subprocess.run([str(Path(sys.executable).parent / "mlflow"), *command.split(" ")[2:]], env=env,
                              capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert train_cli(params)["rounds"] == 1


def test_a_run_deleted_in_the_ui_is_continued_in_a_new_run_tagged_with_it(prefect_harness, tmp_path, monkeypatch,
                                                                           capfd, caplog):
    from flows.lifecycle import Interrupted
    from tasks.checkpoints import RoundSaver

    params, config = prepare_run(tmp_path, rounds=3)
    save = RoundSaver.save

    def save_then_stop_after_round_1(self, server, outcome):
        saved = save(self, server, outcome)
        if outcome.round == 1:
            raise Interrupted(signal.SIGINT)
        return saved

    with monkeypatch.context() as patched:
        patched.setattr(RoundSaver, "save", save_then_stop_after_round_1)
        with pytest.raises(SystemExit):
            train_cli(params)
    client = MlflowClient(config.tracking.mlflow_uri)
    [deleted] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    client.delete_run(deleted.info.run_id)
    capfd.readouterr()

    summary = train_cli(params)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert f"MLflow run {deleted.info.run_id} (named by the checkpoints' run.json) was deleted from" in caplog.text
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["continues_run"] == deleted.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 3]


def test_a_locked_store_mid_run_costs_seconds_and_prints_no_mlflow_tracebacks(prefect_harness, tmp_path,
                                                                              monkeypatch, capfd, caplog):
    """Another process holds the sqlite store's write lock during rounds 2 and 3: MLflow waits 20 s on each call
    and logs a 40-line ERROR traceback for each; the tracker probes the lock for at most 2 s per send."""
    params, config = prepare_run(tmp_path, rounds=4)
    db = str(tmp_path / "mlflow.db")
    holder, locked = [], []
    report = RoundReporter.__call__

    def report_and_lock_from_round_1_to_3(self, server, rnd, metrics):
        report(self, server, rnd, metrics)
        if rnd == 1:
            self.tracker.flush()
            holder.append(subprocess.Popen(
                [sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], "
                 "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(600)",
                 db], stdout=subprocess.PIPE, text=True))
            holder[0].stdout.readline()
            locked.append(time.perf_counter())
        if rnd == 3:
            holder[0].kill()
            holder[0].wait()
            locked.append(time.perf_counter())

    monkeypatch.setattr(RoundReporter, "__call__", report_and_lock_from_round_1_to_3)
    try:
        summary = train_cli(params)
    finally:
        for proc in holder:
            proc.kill()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text and "ERROR mlflow" not in out + err + caplog.text
    print(f"store locked for {locked[1] - locked[0]:.1f} s of training")
    assert locked[1] - locked[0] < 15  # rounds 2 and 3 (~1 s each) and their sends; MLflow alone: over 40 s
    client = MlflowClient(config.tracking.mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]


def test_evaluate_checks_the_store_before_any_work(tmp_path, capfd):
    """A damaged store made evaluate write eval.json and then fail with a traceback when it logged the result."""
    from fedmef_core.checkpoint import save_checkpoint
    from fedmef_core.data import load_dataset
    from fedmef_core.device import resolve_device
    from fedmef_core.engine import Server
    from flows.evaluate import evaluate_flow
    from tests.conftest import save_partition_of

    params, config = prepare_run(tmp_path, rounds=1)
    train, test = load_dataset(config.data)
    server = Server(config, train, test, save_partition_of(config), resolve_device("cpu"))
    save_checkpoint(tmp_path / "checkpoints" / "final.pt", server.checkpoint())
    (tmp_path / "mlflow.db").write_bytes(os.urandom(20_000))
    with pytest.raises(SystemExit) as ended:
        flows.cli.main(evaluate_flow, preflight.for_evaluate, argv=["--params", str(params)])
    assert ended.value.code == 2
    assert _one_error_line(capfd).startswith(f"error: MLflow tracking store {config.tracking.mlflow_uri} is damaged")
    assert not (tmp_path / "metrics" / "eval.json").exists()


def _runs(config) -> list:
    client = MlflowClient(config.tracking.mlflow_uri)
    return client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])


def test_a_folder_made_read_only_mid_run_is_one_message_and_keeps_the_last_good_checkpoint(
        prefect_harness, tmp_path, capsys, monkeypatch):
    """After round 1's checkpoint the checkpoints folder is made immutable for real (`chattr +i`: root ignores
    permission bits, not this); round 2's checkpoint then fails with EPERM."""
    from fedmef_core.checkpoint import load_checkpoint
    from tasks.checkpoints import RoundSaver

    params, config = prepare_run(tmp_path, rounds=3)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    subprocess.run(["chattr", "-i", str(folder)], check=True)
    save_round = RoundSaver.save_round

    def then_freeze(self, server, rnd):
        saved = save_round(self, server, rnd)
        if rnd == 1:
            subprocess.run(["chattr", "+i", str(folder)], check=True)
        return saved

    monkeypatch.setattr(RoundSaver, "save_round", then_freeze)
    try:
        with pytest.raises(SystemExit) as ended:
            train_cli(params)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and "Traceback" not in out + err, err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert line.startswith(f"error: cannot write {folder / 'round_0002.pt'}: operation not permitted; make {folder} "
                           "writable")
    assert load_checkpoint(folder / "round_0001.pt")["round"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["round_0001.pt", "round_0001.pt.sha256"]
    assert [r.info.status for r in _runs(config)] == ["FAILED"]


def test_a_request_mlflow_refuses_ends_the_training_at_once_and_the_run_failed(prefect_harness, tmp_path, capsys,
                                                                                 monkeypatch):
    """A metric name MLflow refuses (a bug, as the tier name ``1_04858e+06mib`` of a 1048576 MiB budget was) is
    reported at once in one line — not retried as an outage, the run left RUNNING and the exit status 0."""
    params, config = prepare_run(tmp_path, rounds=3)
    report = RoundReporter.__call__

    def report_a_name_mlflow_refuses(self, server, rnd, metrics):
        report(self, server, rnd, metrics)
        self.tracker.log_metrics({"devices/1_04858e+06mib/sampled": 3.0}, step=rnd)
        self.tracker.flush()

    monkeypatch.setattr(RoundReporter, "__call__", report_a_name_mlflow_refuses)
    with pytest.raises(SystemExit) as ended:
        train_cli(params)
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and "Traceback" not in out + err, err
    assert "unreachable" not in out + err and "training goes on" not in out + err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert line.startswith(f"error: MLflow tracking store {config.tracking.mlflow_uri} refused metrics of steps 1 (")
    assert "devices/1_04858e+06mib/sampled" in line and "this is a bug" in line
    assert not (tmp_path / "checkpoints" / "round_0002.pt").exists()  # stopped at once, in round 1
    [run] = _runs(config)
    assert run.info.status == "FAILED" and "memory/footprint_mib" in run.data.metrics  # what came before, sent
