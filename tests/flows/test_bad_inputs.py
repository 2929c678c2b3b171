"""Hostile input files, through the real CLI entry: one clear message, exit 2, refused before round 1.

The partition is written by the real partition stage, then edited or mismatched as a user might; the
train command must refuse it in its preflight, before Prefect starts and before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedmef_core.config import ExperimentConfig, parse_config
from fedmef_core.runs import run_facts
from flows.cli import main
from flows.train import train_flow
from tasks import preflight
from tasks.partitioning import partition_dataset
from tests.conftest import PARTITION_EDITS, RERUN_PARTITION, edit_partition, tiny_raw

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path]:
    """params.yaml of a tiny experiment and the partition its partition stage wrote."""
    work = tmp_path_factory.mktemp("partitioned")
    config = parse_config(tiny_raw(work))
    (work / "params.yaml").write_text(config.to_yaml())
    partition_dataset.fn(config)
    return work / "params.yaml", Path(config.runtime.partitions_dir)


@pytest.fixture
def train_cli(stage, tmp_path, capsys):
    """(partition folder, run): `run(*overrides)` runs `python -m flows.train` in-process on a fresh copy of
    the partition and returns its stderr, after checking exit 2, no traceback and nothing written."""
    params, made = stage
    parts = tmp_path / "partitions"
    shutil.copytree(made, parts)
    outputs = {key: tmp_path / key for key in ("checkpoints_dir", "metrics_dir", "plots_dir")}
    argv = ["--params", str(params), "--set", f"runtime.partitions_dir={parts}", "--set", f"runtime.run_dir={tmp_path}"]
    for key, path in outputs.items():
        argv += ["--set", f"runtime.{key}={path}"]

    def run(*overrides: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(train_flow, preflight.for_train, argv=argv + [a for o in overrides for a in ("--set", o)])
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert list(tmp_path.iterdir()) == [parts]  # no checkpoint, metric or plot: no round ran
        return err

    return parts, run


@pytest.mark.parametrize("edit", PARTITION_EDITS.values(), ids=PARTITION_EDITS.keys())
def test_edited_partition_is_refused_before_round_1(train_cli, edit):
    change, message = edit
    parts, run = train_cli
    edit_partition(parts, change)
    assert_says(run(), f"{parts / 'clients.json'}.*{message}")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train_limit=1000", "made for data.train_limit=1200 but this run has data.train_limit=1000"),
        ("data.train_limit=null", "made for data.train_limit=1200 but this run has data.train_limit=null"),
        ("federation.num_clients=5", "made for federation.num_clients=6 but this run has federation.num_clients=5"),
        ("partition.seed=2", "made for partition.seed=1 but this run has partition.seed=2"),
    ],
)
def test_partition_made_for_other_settings_is_refused_before_round_1(train_cli, override, message):
    _, run = train_cli
    assert_says(run(override), message)


def assert_says(err: str, pattern: str) -> None:
    assert re.search(f"{pattern}.*{RERUN_PARTITION}", err), err


def test_cuda_without_a_gpu_is_one_message_before_prefect_starts(stage, tmp_path):
    """A real subprocess with no GPU visible (CUDA_VISIBLE_DEVICES empty), whatever this machine has."""
    params, made = stage
    home = tmp_path / "home"
    home.mkdir()
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "CUDA_VISIBLE_DEVICES": ""}
    for flow in ("flows.train", "flows.evaluate"):
        proc = subprocess.run(
            [sys.executable, "-m", flow, "--params", str(params), "--set", "runtime.device=cuda"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.startswith("error: runtime.device is 'cuda' but no CUDA device is visible")
        assert "runtime.device=cpu" in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert sorted(p.name for p in made.parent.iterdir()) == ["params.yaml", "partitions"]  # as staged


TRAIN_JSON = {"accuracy": 0.5, "loss": 1.2, "rounds": 3, "method": "fedavg", "density": 1.0, "seed": 3}
RUN_JSON = {**run_facts(ExperimentConfig(), "split", "run-7"),  # of params.yaml's experiment, as written by `{}`
            "rounds_run": 3, "seconds": 9.0, "seconds_per_round": 3.0, "model_uri": ""}
EVAL_JSON = {"accuracy": 0.5, "loss": 1.2, "round": 3, "per_class_accuracy": {}, "test_samples": 500}


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("eval.json", json.dumps(EVAL_JSON)[:30], "eval.json is not valid JSON"),  # truncated
        ("eval.json", "[]", "eval.json holds a list, not the JSON object"),
        ("eval.json", json.dumps({**EVAL_JSON, "accuracy": "high"}), "eval.json: 'accuracy' holds 'high'"),
        ("train.json", json.dumps({k: v for k, v in TRAIN_JSON.items() if k != "rounds"}), "'rounds' holds nothing"),
        ("run.json", json.dumps({**RUN_JSON, "seconds": True}), "run.json: 'seconds' holds True"),
        ("run.json", json.dumps({**RUN_JSON, "identity": 7}), "run.json: 'identity' holds 7"),
    ],
    ids=["truncated", "not-an-object", "wrong-type", "missing-key", "bool-for-number", "run-facts-wrong-type"],
)
def test_summary_of_a_metrics_file_that_lies_is_one_message(tmp_path, capsys, name, text, says):
    from flows import summary

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "train.json").write_text(json.dumps(TRAIN_JSON))
    (metrics / "eval.json").write_text(json.dumps(EVAL_JSON))
    argv = ["--params", str(tmp_path / "p.yaml"), "--set", f"runtime.run_dir={tmp_path}"]
    (tmp_path / "p.yaml").write_text("{}\n")
    summary.main(argv)  # no run.json (outputs from `dvc pull`): the results without this copy's run facts
    out = capsys.readouterr().out
    assert "=== fedmef: run summary ===" in out and "rounds        3\n" in out and "MLflow run" not in out
    (metrics / "run.json").write_text(json.dumps(RUN_JSON))
    summary.main(argv)
    out = capsys.readouterr().out  # the files as written: a summary with the run's time and MLflow run
    assert "3.00 s/round, 9 s total" in out and "MLflow run    run-7 in experiment" in out
    (metrics / name).write_text(text)
    with pytest.raises(SystemExit) as ended:
        summary.main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {metrics / name}") and says in err and "to write it again" in err


def _trace_run(tmp_path: Path, trace: bytes):
    from tests.conftest import prepare_run, train_cli

    params, config = prepare_run(tmp_path, rounds=2)
    (tmp_path / "trace.csv").write_bytes(trace)
    return config, lambda: train_cli(params, "devices.profile=trace", f"devices.trace={tmp_path / 'trace.csv'}")


def test_a_trace_that_is_not_utf8_is_one_message_naming_the_file_and_line(prefect_harness, tmp_path, capsys):
    config, train = _trace_run(tmp_path, b"client_id,memory_mib\n0,64\n1,64 # caf\xe9\n")
    with pytest.raises(SystemExit) as ended:
        train()
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and "Traceback" not in out + err, err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert line == (f"error: devices.trace {tmp_path / 'trace.csv'}: byte 0xe9 on line 3 is not UTF-8; save the file "
                    "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and run again")


def test_a_budget_of_any_size_is_a_tier_and_metric_name_mlflow_accepts(prefect_harness, tmp_path):
    """1048576 MiB was the tier `1_04858e+06mib` (a name MLflow refuses, and 1048577 MiB the same tier)."""
    from mlflow.tracking import MlflowClient

    budgets = [1048576, 1048577, 2048, 64.5, 1048576, 2048]
    config, train = _trace_run(tmp_path, ("client_id,memory_mib\n" + "".join(
        f"{c},{b}\n" for c, b in enumerate(budgets))).encode())
    summary = train()
    devices = json.loads((tmp_path / "metrics" / "devices.json").read_text())
    assert [t["tier"] for t in devices["tiers"]] == ["64_5mib", "2048mib", "1048576mib", "1048577mib"]  # one per budget
    run = MlflowClient(config.tracking.mlflow_uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {"devices/1048576mib/participation", "devices/1048577mib/sampled"} <= set(run.data.metrics)
