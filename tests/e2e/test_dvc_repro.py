"""The real thing: `dvc repro` in a fresh git repository, three stages, each a Prefect flow, tracked in MLflow;
then, on the same repository, a queued DVC grid over the one seed, and a DVC remote that a fresh clone pulls from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedmef_core.config import parse_config
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[2]
COPIED = ["fedmef_core", "services", "tasks", "flows", "dvc.yaml", ".dvcignore", ".gitignore"]


def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


def _commit(repo: Path, env: dict[str, str], message: str) -> None:
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-q", "--allow-empty", "-m", message], repo, env)


def _write_params(repo: Path, rounds: int, pruning: dict | None = None, **sap) -> None:
    raw = tiny_raw()
    raw["partition"].pop("seed"), raw["federation"].pop("seed")  # both follow the top-level seed (0): `-S seed=1`
    raw["federation"]["rounds"] = rounds
    raw["pruning"] = pruning or raw["pruning"]
    raw["sap"] = sap
    raw["tracking"] = {"enabled": True, "mlflow_uri": "sqlite:///mlflow.db", "experiment": "e2e"}
    raw["runtime"]["checkpoint_every"] = 2
    config = parse_config(raw)  # the full, validated config: every key spelled out
    (repo / "params.yaml").write_text(config.to_yaml())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "project"
    repo.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    _write_params(repo, rounds=2)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(repo.parent / "prefect-home"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    env.pop("PREFECT_API_URL", None)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _sh(cmd, repo, env)
    first = _sh(["dvc", "repro"], repo, env)
    return repo, env, first


def test_repro_runs_all_stages_and_tracks_the_run(repo):
    path, _, output = repo
    for stage in ("partition", "train", "evaluate"):
        assert f"Running stage '{stage}'" in output
    assert (path / "data" / "partitions" / "clients.json").is_file()
    assert (path / "checkpoints" / "final.pt").is_file()
    evaluation = json.loads((path / "metrics" / "eval.json").read_text())
    train = json.loads((path / "metrics" / "train.json").read_text())
    assert 0.3 < evaluation["accuracy"] <= 1 and train["rounds"] == 2
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"partition", "train", "evaluate"}
    assert lock["stages"]["train"]["params"]["params.yaml"]["federation"]["rounds"] == 2

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    run = client.get_run(json.loads((path / "metrics" / "run.json").read_text())["mlflow_run_id"])
    assert run.data.tags["dvc_stage"] == "train"
    assert len(run.data.tags["git_commit"]) == 40
    assert run.data.params["data.train_limit"] == "1200"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [1, 2]
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "checkpoints", "eval"} <= top


def test_repro_again_does_nothing_then_rounds_change_reruns_train_and_evaluate(repo):
    path, env, _ = repo
    second = _sh(["dvc", "repro"], path, env)
    assert "Running stage" not in second, second
    assert "Data and pipelines are up to date" in _sh(["dvc", "status"], path, env)
    shown = _sh(["dvc", "metrics", "show"], path, env)
    assert "metrics/memory.json" in shown and "metrics/train.json" in shown

    _write_params(path, rounds=3)
    third = _sh(["dvc", "repro"], path, env)
    assert "Running stage 'partition'" not in third
    assert "Running stage 'train'" in third and "Running stage 'evaluate'" in third
    assert json.loads((path / "metrics" / "train.json").read_text())["rounds"] == 3


def test_a_sap_change_reruns_training(repo):
    """`dvc exp run -S sap.gamma=…` used to print "didn't change, skipping" and keep the old accuracy."""
    path, env, _ = repo
    _write_params(path, rounds=3, gamma=0.7)
    rerun = _sh(["dvc", "repro"], path, env)
    assert "Running stage 'train'" in rerun and "Running stage 'partition'" not in rerun
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["sap"]["gamma"] == 0.7


def test_a_code_change_trains_again_from_round_1(repo):
    """A change to a dependency re-runs the train stage; DVC removes its outputs but keeps the persisted
    checkpoints, whose training had ended: it used to report "already trained" and write nothing, and
    `dvc repro` failed on the missing rounds.csv. Now it trains again, in a new MLflow run."""
    path, env, _ = repo
    before = json.loads((path / "metrics" / "run.json").read_text())["mlflow_run_id"]
    with open(path / "fedmef_core" / "evaluation.py", "a") as f:
        f.write("# a change to the code\n")
    rerun = _sh(["dvc", "repro"], path, env)
    assert "Running stage 'train'" in rerun and "training again from round 1" in rerun, rerun
    rounds = (path / "metrics" / "rounds.csv").read_text().splitlines()
    trained = json.loads((path / "metrics" / "train.json").read_text())["rounds"]
    assert [line.split(",")[0] for line in rounds[1:]] == [str(r) for r in range(1, trained + 1)]
    assert json.loads((path / "metrics" / "run.json").read_text())["mlflow_run_id"] != before
    assert "Data and pipelines are up to date" in _sh(["dvc", "status"], path, env)


def test_a_queued_experiment_is_tracked_in_the_repositorys_store(repo):
    path, env, _ = repo
    _sh(["git", "add", "-A"], path, env)
    _sh(["git", "commit", "-qm", "baseline"], path, env)
    _sh(["dvc", "exp", "run", "--queue", "-n", "queued-one", "-S", "federation.rounds=1"], path, env)
    _sh(["dvc", "exp", "run", "--run-all", "-j", "1"], path, env)
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], path, env).strip().splitlines()[-1])
    runs = [
        e for rev in shown for e in (rev.get("experiments") or [])
        if (e.get("name") == "queued-one")
    ]
    assert runs, f"no experiment 'queued-one' in {shown!r}"[:3000]
    train = runs[0]["revs"][0]["data"]["metrics"]["metrics/train.json"]["data"]
    assert train["rounds"] == 1
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")  # the repository's store, not one in .dvc/tmp/exps
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                               filter_string="tags.dvc_experiment = 'queued-one'")
    assert run.data.params["federation.rounds"] == "1"


def _experiments(repo: Path, env: dict[str, str]) -> list[dict]:
    """`dvc exp show --json`'s experiments: name, params.yaml and metrics of each."""
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env).strip().splitlines()[-1])
    return [{"name": e.get("name"), **e["revs"][0]["data"]} for rev in shown for e in (rev.get("experiments") or [])]


def test_a_paired_grid_over_the_one_seed_is_one_queue_command(repo, prefect_harness):
    """`-S pruning.density=0.1,0.2 -S seed=0,1` queues the four cells; in each the split and the training follow
    the one seed, so the two densities of a seed train on the same shards."""
    from prefect.settings import PREFECT_API_URL

    path, env, _ = repo
    env = {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}  # one Prefect server for every stage of the grid
    _commit(path, env, "grid baseline")
    # the grid itself; the other -S keep it small (MLflow off: two cells at once would share one sqlite file)
    _sh(["dvc", "exp", "run", "--queue", "-S", "pruning.density=0.1,0.2", "-S", "seed=0,1",
         "-S", "pruning.method=fedavg_static", "-S", "federation.rounds=1", "-S", "tracking.enabled=false"], path, env)
    _sh(["dvc", "exp", "run", "--run-all", "-j", "2"], path, env)
    cells = {}
    for exp in _experiments(path, env):
        params = exp["params"]["params.yaml"]["data"]
        if params["pruning"]["method"] == "fedavg_static":
            cells[params["pruning"]["density"], params["seed"]] = exp
    assert sorted(cells) == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)], sorted(cells)
    for (density, seed), exp in cells.items():
        assert exp["params"]["params.yaml"]["data"]["partition"]["seed"] is None  # it follows `seed`
        train = exp["metrics"]["metrics/train.json"]["data"]
        assert (train["density"], train["seed"], train["rounds"]) == (density, seed, 1)
        assert 0 < exp["metrics"]["metrics/eval.json"]["data"]["accuracy"] <= 1
    # partition.seed followed too: the same shards for both densities of a seed, other shards for the other seed
    shards = {key: exp["deps"]["data/partitions"]["hash"] for key, exp in cells.items()}
    assert shards[0.1, 0] == shards[0.2, 0] != shards[0.1, 1] == shards[0.2, 1]


def test_a_fresh_clone_pulls_the_outputs_from_a_dvc_remote_and_has_nothing_to_reproduce(repo, tmp_path):
    path, env, _ = repo
    _sh(["dvc", "repro"], path, env)  # the workspace matches dvc.lock
    remote = tmp_path / "dvc-remote"
    _sh(["dvc", "remote", "add", "-d", "local", str(remote)], path, env)
    _commit(path, env, "outputs and the DVC remote")  # dvc.lock, .dvc/config and the uncached metrics and plots
    _sh(["dvc", "push"], path, env)
    assert any(remote.rglob("*")), "dvc push stored nothing"

    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    assert not (clone / "checkpoints").exists() and not (clone / "data" / "partitions").exists()
    _sh(["dvc", "pull"], clone, env)
    for out in ("checkpoints/final.pt", "data/partitions/clients.json"):
        assert (clone / out).read_bytes() == (path / out).read_bytes(), out
    again = _sh(["dvc", "repro"], clone, env)
    assert "Running stage" not in again, again
    assert "Data and pipelines are up to date" in _sh(["dvc", "status"], clone, env)


def test_a_fresh_clone_trains_again_to_the_same_bytes_and_leaves_git_status_clean(repo, tmp_path):
    """Issue #21, what `make run` does in a fresh clone: partition and train run again and write their outputs
    bit for bit as committed (so evaluate, whose deps are unchanged, is skipped; forced, it does the same), and
    dvc.lock, the metrics and the plots stay as they were. Before, train.json held the run's seconds
    and MLflow run id and the checkpoints both too: dvc.lock changed on every run. The clone shares the store, so
    its training is a new MLflow run and a new version of the registered model: those go to run.json (ignored)."""
    path, env, _ = repo
    _write_params(path, rounds=2, pruning={"method": "fedmef", "density": 0.2, "adjust_interval": 1,
                                           "adjust_until": 1})  # sparse, with SAP: masks files and mask plots too
    _sh(["dvc", "repro"], path, env)
    _commit(path, env, "a sparse experiment: dvc.lock and the uncached metrics and plots")
    assert _sh(["git", "status", "--porcelain"], path, env) == ""

    clone = tmp_path / "fresh"
    _sh(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    shutil.copy2(path / "mlflow.db", clone / "mlflow.db")  # the same MLflow store (git ignores it)
    again = _sh(["dvc", "repro"], clone, env)
    assert "Running stage 'train'" in again, again  # no outputs in the clone: it trains
    assert "Stage 'evaluate' didn't change, skipping" in again, again  # the same checkpoints: its deps unchanged
    assert list((clone / "checkpoints").glob("masks_round_*.pt"))
    _sh(["dvc", "repro", "--force", "--single-item", "evaluate"], clone, env)  # and evaluate's outputs, written again
    status = _sh(["git", "status", "--porcelain"], clone, env)
    assert status == "", status + _sh(["git", "diff"], clone, env)[-3000:]
    assert "Data and pipelines are up to date" in _sh(["dvc", "status"], clone, env)
    first, second = (json.loads((where / "metrics" / "run.json").read_text()) for where in (path, clone))
    assert first["mlflow_run_id"] != second["mlflow_run_id"] and first["model_uri"] != second["model_uri"]
