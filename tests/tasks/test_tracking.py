import pytest
from mlflow.tracking import MlflowClient

from fedmef_core.config import ExperimentConfig, TrackingConfig
from tasks.tracking import Tracker, TrackingUnavailable, store_uri


def test_tracker_writes_params_metrics_tags_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train")
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ExperimentConfig(tracking=TrackingConfig(mlflow_uri=uri, experiment="t"))
    tracker = Tracker(config.tracking)
    run_id = tracker.start(config, run_name="r")
    tracker.log_metrics({"accuracy": 0.5}, step=1)
    tracker.log_metrics({"accuracy": 0.75}, step=2)
    note = tmp_path / "note.txt"
    note.write_text("hi")
    tracker.log_artifact(note, "notes")
    tracker.end()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["federation.rounds"] == str(config.federation.rounds)
    assert run.data.params["pruning.method"] == "fedmef"
    # resolved values, not "auto"/None: what ran
    assert (run.data.params["model.norm"], run.data.params["sap.enabled"]) == ("nsconv", "True")
    assert run.data.tags["dvc_stage"] == "train" and run.data.tags["dvc_experiment"] == "lucky-lark"
    assert (run.data.tags["method"], run.data.tags["density"], run.data.tags["seed"]) == ("fedmef", "0.1", "0")
    assert run.data.tags["git_commit"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "accuracy")] == [(1, 0.5), (2, 0.75)]
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the sqlite store


def test_unreachable_server_fails_fast_naming_the_uri():
    import time

    tracker = Tracker(TrackingConfig(mlflow_uri="http://127.0.0.1:9"))  # nothing listens on port 9
    start = time.perf_counter()
    with pytest.raises(TrackingUnavailable, match="127.0.0.1:9.*tracking.mlflow_uri"):
        tracker.start(ExperimentConfig(), run_name="x")
    assert time.perf_counter() - start < 10


def test_disabled_tracker_does_nothing():
    tracker = Tracker(TrackingConfig(enabled=False))
    assert tracker.start(ExperimentConfig(), run_name="x") == ""
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.end()


def test_dense_fedavg_logs_density_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ExperimentConfig.model_validate(
        {"pruning": {"method": "fedavg", "density": 0.1}, "tracking": {"mlflow_uri": uri, "experiment": "t"}}
    )
    tracker = Tracker(config.tracking)
    run = MlflowClient(uri).get_run(tracker.start(config, run_name="dense"))
    assert run.data.params["pruning.density"] == "1.0" and run.data.params["sap.enabled"] == "False"


def test_relative_store_resolves_to_the_repository_also_in_a_dvc_queue_workspace(tmp_path):
    repo = tmp_path / "repo"
    workspace = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace.mkdir(parents=True)
    assert store_uri("sqlite:///mlflow.db", cwd=workspace) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert store_uri("sqlite:///mlflow.db", cwd=repo) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert store_uri("sqlite:////abs/m.db", cwd=workspace) == "sqlite:////abs/m.db"
    assert store_uri("http://127.0.0.1:5000", cwd=workspace) == "http://127.0.0.1:5000"
