import pytest
from mlflow.tracking import MlflowClient

from fedmef_core.config import ExperimentConfig, TrackingConfig
from tasks.tracking import Tracker, TrackingUnavailable


def test_tracker_writes_params_metrics_tags_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train")
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
    assert run.data.params["pruning.method"] == "fedavg"
    assert run.data.tags["dvc_stage"] == "train"
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
