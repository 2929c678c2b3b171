"""Signals as people send them: Ctrl-C to the terminal's process group, SIGTERM to the process, kill -9.

Each run is a real `python -m flows.train` subprocess in its own session (so the group signal reaches it
and its children, not pytest), with Prefect's temporary server and a real sqlite MLflow store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import prepare_run, processes_with_home, standalone_env, train_cli


def _start(tmp_path: Path, params: Path) -> tuple[subprocess.Popen, Path]:
    home = tmp_path / "prefect-home"
    proc = subprocess.Popen([sys.executable, "-m", "flows.train", "--params", str(params)], cwd=tmp_path,
                            env=standalone_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, home


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def _no_orphans(home: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (left := processes_with_home(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda p: os.killpg(p.pid, signal.SIGINT), 130),  # Ctrl-C in a terminal: the whole process group
        (lambda p: p.send_signal(signal.SIGTERM), 143),  # kill, timeout, systemd, Kubernetes
        (lambda p: os.killpg(p.pid, signal.SIGHUP), 129),  # the terminal or ssh session closed
        (lambda p: os.killpg(p.pid, signal.SIGQUIT), 131),  # Ctrl-\ in a terminal
    ],
    ids=["sigint-to-group", "sigterm", "sighup-to-group", "sigquit-to-group"],
)
def test_interrupt_stops_cleanly_and_the_run_resumes(tmp_path, send, code):
    params, config = prepare_run(tmp_path, rounds=4)
    proc, home = _start(tmp_path, params)
    _wait_for(Path(config.runtime.checkpoints_dir) / "round_0002.pt.sha256", proc)
    send(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "interrupted: the last checkpoint is kept" in err
    assert "Traceback" not in err and "ConnectError" not in err, err[-3000:]
    _no_orphans(home)
    assert not (tmp_path / ".exchange").exists()
    client = MlflowClient(config.tracking.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "KILLED"

    again, home = _start(tmp_path, params)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming from round" in out + err
    _no_orphans(home)


def test_kill_9_leaves_no_temporary_server_behind(tmp_path):
    params, config = prepare_run(tmp_path, rounds=4)
    proc, home = _start(tmp_path, params)
    _wait_for(Path(config.runtime.checkpoints_dir) / "round_0001.pt.sha256", proc)
    assert len(processes_with_home(home)) >= 2  # the flow and its temporary Prefect server
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _no_orphans(home)


def test_every_way_a_flow_is_stopped_has_its_shells_exit_status():
    """The CLI and the sweep share one mapping: 128 + the signal's number, whatever raised it."""
    from prefect.exceptions import TerminationSignal

    from flows.lifecycle import Interrupted, exit_code

    assert exit_code(Interrupted(signal.SIGINT)) == exit_code(KeyboardInterrupt()) == 130
    assert exit_code(Interrupted(signal.SIGTERM)) == exit_code(TerminationSignal(signal.SIGTERM)) == 143
    assert exit_code(Interrupted(signal.SIGHUP)) == 129 and exit_code(Interrupted(signal.SIGQUIT)) == 131


def test_a_signal_while_prefect_starts_a_rounds_task_run_still_stops_cleanly(prefect_harness, tmp_path,
                                                                             monkeypatch, capsys):
    """The round's clients are a Prefect task run in this thread; a signal that lands while Prefect creates
    it makes Prefect's own crash handler fail (``ValueError: Task run is not set``). Still: exit 130, one
    line, the MLflow run KILLED, round 1's checkpoint kept."""
    import prefect.task_engine

    params, config = prepare_run(tmp_path, rounds=3)
    create = prefect.task_engine._create_task_run_locally

    def signal_while_creating_round_2s_task_run(*args, **kwargs):
        if kwargs["task"].name == "client-wave" and kwargs["parameters"]["rnd"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here, before the task run exists
        return create(*args, **kwargs)

    monkeypatch.setattr(prefect.task_engine, "_create_task_run_locally", signal_while_creating_round_2s_task_run)
    with pytest.raises(SystemExit) as stopped:
        train_cli(params)
    assert stopped.value.code == 130
    assert "interrupted: the last checkpoint is kept" in capsys.readouterr().err
    checkpoints = Path(config.runtime.checkpoints_dir)
    assert (checkpoints / "round_0001.pt").exists() and not (checkpoints / "round_0002.pt").exists()
    client = MlflowClient(config.tracking.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "KILLED"
