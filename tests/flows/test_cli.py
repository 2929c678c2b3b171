"""User mistakes end with one clear message, exit status 2, no traceback and nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, cwd):
    home = cwd.parent / f"{cwd.name}-home"  # import-time caches (matplotlib, Prefect) go here, not in cwd
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home)},
    )


@pytest.mark.parametrize("flow", ["flows.partition", "flows.train", "flows.evaluate", "flows.pipeline"])
def test_bad_params_give_one_message_and_write_nothing(tmp_path, flow):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    (tmp_path / "params.yaml").write_text("federation:\n  rounds: -3\n  roundz: 2\n")
    proc = _run([flow], tmp_path)
    assert proc.returncode == 2
    assert "federation.rounds" in proc.stderr and "-3" in proc.stderr
    assert "federation.roundz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_bad_override_is_reported(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = _run(["flows.train", "--set", "pruning.method=magic"], tmp_path)
    assert proc.returncode == 2 and "pruning.method" in proc.stderr and "magic" in proc.stderr


def test_evaluate_without_a_checkpoint_says_what_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "tracking:\n  enabled: false\ndata:\n  test_limit: 10\n  train_limit: 10\n"
    )
    proc = _run(["flows.evaluate"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dvc repro train" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flow", [["flows.train"], ["flows.sweep", "--methods", "fedtiny"]], ids=["train", "sweep"])
def test_a_yaml_mistake_in_a_set_value_is_one_line(tmp_path, flow):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = _run([*flow, "--set", "federation.lr=[x"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --set 'federation.lr=[x': not valid YAML: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    "content, message",
    [(b"federation:\n  rounds: 2\nfederation:\n  lr: 0.5\n", "'federation' is written twice (lines 1 and 3)"),
     (b"federation:\n  rounds: 2 # \xff\n", "byte 0xff on line 2 is not UTF-8")],
    ids=["section-twice", "not-utf8"],
)
def test_params_yaml_bytes_that_cannot_be_read_as_written_are_one_line(tmp_path, content, message):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    (tmp_path / "params.yaml").write_bytes(content)
    proc = _run(["flows.train"], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_run_dir_under_home_is_written_under_home_not_in_a_folder_named_tilde(prefect_harness, tmp_path,
                                                                              monkeypatch):
    """`--set runtime.run_dir=~/exp` (quoted, so no shell expands it) made a folder literally named `~`."""
    from tests.conftest import prepare_run, train_cli

    params, _ = prepare_run(tmp_path, rounds=1)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train_cli(params, "runtime.run_dir=~/exp", "tracking.enabled=false",
              *(f"runtime.{d}_dir={d}" for d in ("checkpoints", "metrics", "plots")))
    assert (tmp_path / "home" / "exp" / "metrics" / "train.json").is_file()
    assert not (tmp_path / "~").exists()
