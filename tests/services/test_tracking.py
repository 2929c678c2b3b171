import json

import pytest
from mlflow.tracking import MlflowClient

from fedmef_core.config import ExperimentConfig, TrackingConfig
from services.tracking.tracker import Tracker, TrackingUnavailable, store_uri


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
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.note.content"].startswith("**fedmef** · cnn (nsconv) · density 0.1 · seed 0")


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


# --- outside failures: wrong URIs, credentials, lost and orphaned runs, resumes ------------------------------

SECRET = "s3cret-Pa55"


def tracked_config(tmp_path, **tracking):
    from fedmef_core.config import parse_config
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path)
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t",
                       **tracking}
    return parse_config(raw)


def runs_of(config):
    client = MlflowClient(config.tracking.mlflow_uri)
    exp = client.get_experiment_by_name(config.tracking.experiment)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id])} if exp else {}


@pytest.mark.parametrize("uri", ["foo://bar", "mlflow.db", "/tmp/x", "file:///tmp/mlruns", "sqlite://m.db"])
def test_a_uri_mlflow_cannot_use_is_refused_naming_it_and_the_accepted_forms(uri):
    from fedmef_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"tracking": {"mlflow_uri": uri}})
    msg = str(caught.value)
    assert f"tracking.mlflow_uri: {uri!r} is not a tracking URI" in msg
    assert "sqlite:///" in msg and "http(s)://host:port" in msg


def test_a_bare_path_ends_the_cli_with_one_line_and_no_traceback(tmp_path, capsys):
    import flows.cli
    from tasks import preflight

    (tmp_path / "params.yaml").write_text("tracking:\n  mlflow_uri: mlflow.db\n")
    with pytest.raises(SystemExit) as ended:
        flows.cli.main(lambda config: pytest.fail("the flow ran"), preflight.for_train,
                       argv=["--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "'mlflow.db' is not a tracking URI" in err and "Traceback" not in err


@pytest.fixture
def no_mlflow_credentials(monkeypatch):
    """MLflow's credential variables unset during the test and restored after it."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_credentials_leave_the_uri_for_mlflows_variables(no_mlflow_credentials, monkeypatch):
    import os

    cfg = TrackingConfig(mlflow_uri=f"http://ann:{SECRET}@127.0.0.1:5000/")
    assert cfg.mlflow_uri == "http://127.0.0.1:5000/"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ann", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mine")  # a user's own setting wins
    assert TrackingConfig(mlflow_uri="https://bob:other@[::1]:443").mlflow_uri == "https://[::1]:443"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "mine"


def test_the_health_probe_and_mlflow_send_the_credentials_and_no_message_shows_them(no_mlflow_credentials,
                                                                                     monkeypatch):
    """A tiny server that demands basic auth on every request (MLflow's own auth app is too heavy here)."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    expected = "Basic " + base64.b64encode(f"ann:{SECRET}".encode()).decode()
    seen = []

    class DemandsAuth(BaseHTTPRequestHandler):
        def _answer(self):
            seen.append((self.path.split("?")[0], self.headers.get("Authorization") == expected))
            ok = self.headers.get("Authorization") == expected
            body = (b"OK" if self.path == "/health" else json.dumps({"experiments": []}).encode()) if ok else b""
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), DemandsAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        Tracker(TrackingConfig(mlflow_uri=f"http://ann:{SECRET}@127.0.0.1:{port}")).check_reachable()
        assert [p for p, _ in seen] == ["/health", "/api/2.0/mlflow/experiments/search",
                                        "/api/2.0/mlflow/experiments/get-by-name"]  # not deleted in the UI?
        assert all(authorized for _, authorized in seen)

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")  # set by the user: it wins, and is refused
        with pytest.raises(TrackingUnavailable) as caught:
            Tracker(TrackingConfig(mlflow_uri=f"http://ann:{SECRET}@127.0.0.1:{port}")).check_reachable()
        assert f"http://127.0.0.1:{port}" in str(caught.value) and SECRET not in str(caught.value)
    finally:
        server.shutdown()


def test_a_checkpoints_run_missing_from_the_store_continues_in_a_new_tagged_run(tmp_path, capsys):
    from services.tracking.tracker import tracked_run

    config = tracked_config(tmp_path)
    lost = "0123456789abcdef0123456789abcdef"
    with tracked_run(config, "r", run_id=lost) as tracker:
        tracker.log_metrics({"train_loss": 1.0}, step=3)
    assert tracker.run_id != lost
    run = runs_of(config)[tracker.run_id]
    assert run.data.tags["continues_run"] == lost and run.info.status == "FINISHED"
    out = capsys.readouterr().out
    assert f"MLflow run {lost}" in out and f"new run {tracker.run_id}" in out


def test_a_termination_signal_ends_the_run_killed(tmp_path):
    from prefect.exceptions import TerminationSignal

    from services.tracking.tracker import tracked_run

    config = tracked_config(tmp_path)
    with pytest.raises(TerminationSignal), tracked_run(config, "r") as tracker:
        raise TerminationSignal(signal=15)
    assert runs_of(config)[tracker.run_id].info.status == "KILLED"


def test_a_fresh_start_ends_the_run_a_dead_training_left_running(tmp_path, capsys):
    from services.tracking.tracker import tracked_run

    config = tracked_config(tmp_path)
    other_folder = tracked_config(tmp_path / "other", mlflow_uri=config.tracking.mlflow_uri)  # same store
    died = tracked_run(config, "r")
    orphan = died.__enter__().run_id  # the process dies here: no exit, the run stays RUNNING
    elsewhere = tracked_run(other_folder, "o")
    alive = elsewhere.__enter__().run_id
    with tracked_run(config, "r") as tracker:
        pass
    runs = runs_of(config)
    assert runs[orphan].info.status == "KILLED"
    assert runs[tracker.run_id].data.tags["restarts"] == orphan
    assert runs[tracker.run_id].data.tags["run_dir"] == str(tmp_path.resolve())
    assert runs[alive].info.status == "RUNNING"  # another folder's run is left alone
    assert f"MLflow run {orphan} of {tmp_path.resolve()}" in capsys.readouterr().out
    elsewhere.__exit__(None, None, None)
    died.gen.close()  # what the garbage collector would do at exit


def test_a_resume_does_not_log_the_re_run_rounds_again(tmp_path):
    config = tracked_config(tmp_path)
    first = Tracker(config.tracking)
    run_id = first.start(config, run_name="r")
    first.log_metrics({"setup/bn_loss": 2.0}, step=0)
    for rnd in (1, 2, 3):  # checkpoint after round 2, then the process dies after logging round 3
        first.log_metrics({"train_loss": 1.0 / rnd, "accuracy": 0.1 * rnd}, step=rnd)
    resumed = Tracker(config.tracking, run_id=run_id)
    resumed.reopen()
    resumed.log_metrics({"setup/bn_loss": 2.0}, step=0)
    for rnd in (3, 4):
        resumed.log_metrics({"train_loss": 1.0 / rnd, "accuracy": 0.1 * rnd}, step=rnd)
    resumed.log_metrics({"final_accuracy": 0.4}, step=3)  # not in the run yet: logged even at an old step
    resumed.end()

    client = MlflowClient(config.tracking.mlflow_uri)
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)]
             for key in ("setup/bn_loss", "train_loss", "accuracy", "final_accuracy")}
    assert steps == {"setup/bn_loss": [0], "train_loss": [1, 2, 3, 4], "accuracy": [1, 2, 3, 4],
                     "final_accuracy": [3]}


def test_a_training_tracker_holds_metrics_back_and_sends_them_as_one_batch(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ExperimentConfig(tracking=TrackingConfig(mlflow_uri=uri, experiment="t"))
    tracker = Tracker(config.tracking, send_every_s=3600)
    run_id = tracker.start(config, run_name="r")
    sent = []
    real = tracker._client.log_batch
    tracker._client.log_batch = lambda run, metrics: (sent.append(sorted({m.step for m in metrics})),
                                                      real(run, metrics=metrics))
    client = MlflowClient(uri)

    def steps():
        return [m.step for m in client.get_metric_history(run_id, "train_loss")]

    tracker.log_metrics({"train_loss": 1.0, "lr": 0.1}, step=1)  # the first send is due at once
    for rnd in (2, 3, 4):
        tracker.log_metrics({"train_loss": 1.0 / rnd, "lr": 0.1}, step=rnd)
    assert steps() == [1] and sent == [[1]]  # rounds 2-4 held back
    tracker.flush()  # e.g. before a checkpoint
    assert steps() == [1, 2, 3, 4] and sent == [[1], [2, 3, 4]]  # one transaction for three rounds
    tracker.log_metrics({"train_loss": 0.1}, step=5)
    tracker.end()  # the end sends what is still held
    assert steps() == [1, 2, 3, 4, 5] and client.get_run(run_id).info.status == "FINISHED"

    now = [100.0]  # a clock the test moves
    timed = Tracker(config.tracking, send_every_s=2.0, clock=lambda: now[0])
    timed.start(config, run_name="timed")
    timed.log_metrics({"train_loss": 1.0}, step=1)  # the first send
    now[0] += 1.0
    timed.log_metrics({"train_loss": 0.5}, step=2)
    assert timed._held  # within 2 s of the last send
    now[0] += 1.0
    timed.log_metrics({"train_loss": 0.25}, step=3)
    assert not timed._held and not timed.pending  # 2 s after it: due again, everything held went out
    assert [m.step for m in client.get_metric_history(timed.run_id, "train_loss")] == [1, 2, 3]


def test_an_experiment_made_before_gets_the_model_training_kind_and_a_long_description_is_cut(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("old")  # by an earlier version, or another tool: no kind
    config = ExperimentConfig(tracking=TrackingConfig(mlflow_uri=uri, experiment="old"))
    tracker = Tracker(config.tracking)
    run_id = tracker.start(config, run_name="r")
    assert client.get_experiment_by_name("old").tags["mlflow.experimentKind"] == "custom_model_development"
    tracker.describe("| row |\n" * 2000)  # 14,000 characters: a sweep of many cells
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert len(note) <= 8000 and note.endswith("(cut here: the whole text is in the run's artifacts)")
    assert note.startswith("| row |\n| row |")


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_are_logged_only_when_asked(tmp_path, monkeypatch, enabled):
    import time

    from services.tracking.tracker import tracked_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's default: every 10 s
    config = tracked_config(tmp_path, system_metrics=enabled)
    with tracked_run(config, "r") as tracker:
        time.sleep(1.0)
    metrics = runs_of(config)[tracker.run_id].data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    assert bool(system) == enabled, system
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system



def test_the_partition_is_the_runs_dataset_input_once_also_after_a_resume(tmp_path):
    config = tracked_config(tmp_path)
    digest = "0123456789abcdef" * 4  # a sha256: MLflow keeps 36 characters of a digest
    first = Tracker(config.tracking)
    run_id = first.start(config, run_name="r")
    first.log_partition(config, digest, [20, 30, 50])
    resumed = Tracker(config.tracking, run_id=run_id)
    resumed.reopen()
    resumed.log_partition(config, digest, [20, 30, 50])
    (logged,) = MlflowClient(config.tracking.mlflow_uri).get_run(run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("fashion_mnist-dirichlet", digest[:36])
    assert json.loads(logged.dataset.profile) == {"clients": 3, "samples": 100, "partition_sha256": digest,
                                                  "scheme": "dirichlet", "seed": 1}
    assert json.loads(logged.dataset.source)["uri"].endswith("/partitions/clients.json")


@pytest.mark.parametrize("name", ["o'brien", 'say "hi"', "back\\slash", "100%_x", "plain"])
def test_a_filter_value_matches_exactly_the_text_it_quotes(tmp_path, name):
    from services.tracking.tracker import filter_value

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")
    for other in ("o", "brien", "say", name + "x"):
        client.create_run(exp, run_name=other, tags={"t": other})
    run = client.create_run(exp, run_name=name, tags={"t": name})
    for where in (f"attributes.run_name = {filter_value(name)}", f"tags.`t` = {filter_value(name)}"):
        assert [r.info.run_id for r in client.search_runs([exp], where)] == [run.info.run_id]


def test_a_refused_request_is_told_from_a_store_that_is_away():
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    from services.tracking.tracker import refused

    def error(code):
        return MlflowException("...", error_code=getattr(codes, code))

    assert all(refused(error(c)) for c in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"))
    assert not refused(MlflowException("API request failed with exception ConnectionError"))  # INTERNAL_ERROR
    assert not any(refused(error(c)) for c in ("REQUEST_LIMIT_EXCEEDED", "TEMPORARILY_UNAVAILABLE"))  # 429, 503
    assert not refused(ConnectionError("refused"))
