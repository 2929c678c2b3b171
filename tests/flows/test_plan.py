"""`python -m flows.plan`: a plan per method, as JSON or a table; user mistakes are one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.plan import main

ROOT = Path(__file__).resolve().parents[2]


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "flows.plan", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


def test_json_has_one_plan_per_method(tmp_path):
    (tmp_path / "params.yaml").write_text("federation:\n  batch_size: 16\n")
    proc = _run(["--arch", "cnn", "--budget", "2", "--method", "fedavg", "fedmef", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = json.loads(proc.stdout)
    assert list(plans) == ["fedavg", "fedmef"]
    for plan in plans.values():
        assert {"fits", "batch_size", "gamma", "footprint_mib", "total_mib", "parts_mib"} <= set(plan)
        assert set(plan["parts_mib"]) == {"weights", "activations", "gradients", "optimizer"}
        assert plan["footprint_mib"] == pytest.approx(plan["parts_mib"]["weights"] + plan["parts_mib"]["activations"])
        assert plan["footprint_mib"] <= 2 or not plan["fits"]
    # 2 MiB: dense FedAvg's step needs more even at batch 1; FedMef fits once γ is raised above 0.5
    assert plans["fedavg"] == {**plans["fedavg"], "fits": False, "batch_size": 1, "gamma": None}
    assert plans["fedavg"]["footprint_mib"] > 2
    assert plans["fedmef"]["fits"] and 0.5 < plans["fedmef"]["gamma"] <= 0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_bad_arch_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = _run(["--arch", "resnet50", "--budget", "64"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: argument --arch: invalid choice: 'resnet50'"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--budget", "-1"], "--budget must be a positive number of MiB, got -1"),
    (["--budget", "nan"], "argument --budget: 'nan' is not a finite number"),
    (["--budget", "inf"], "argument --budget: 'inf' is not a finite number"),
    (["--budget", "64", "--max-gamma=-inf"], "argument --max-gamma: '-inf' is not a finite number"),
    (["--budget", "64", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
    (["--budget", "64", "--min-batch", "40"], "--min-batch 40 is above the batch size 32"),
    (["--budget", "64", "--set", "federation.batch_size=0"], "federation.batch_size"),
], ids=["budget", "budget-nan", "budget-inf", "gamma-inf", "method", "min-batch", "config"])
def test_user_mistakes_exit_2_with_one_message(tmp_path, capsys, args, says):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--arch", "cnn", "--params", str(tmp_path / "params.yaml"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err


def test_table_shows_the_measured_step_beside_the_plan(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("federation:\n  batch_size: 8\n")
    plans = main(["--arch", "cnn", "--budget", "64", "--method", "fedmef", "--measure", "--bound", "total",
                  "--params", str(tmp_path / "params.yaml")])
    out = capsys.readouterr().out
    assert out.startswith("| method | trains | batch | γ |") and "measured footprint" in out
    assert "| fedmef | yes | 8 | 0.5 |" in out and "on the total" in out
    plan = plans["fedmef"]
    assert plan["measured"]["footprint_mib"] == pytest.approx(plan["footprint_mib"], rel=0.02)
    assert plan["measured"]["total_mib"] == pytest.approx(plan["total_mib"], rel=0.02)
