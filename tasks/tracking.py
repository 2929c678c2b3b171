"""MLflow tracking: one run per training, addressed by id (no global "active run").

The store is checked before any work (a wrong or dead URI is one message). Once a run is open, tracking
never stops a training: an outage mid-run prints one warning, the tracker keeps what it could not send in
memory and sends it at the next round's metrics or at the end, where it says what was lost, if anything.

A training's tracker sends its per-round metrics at most every `send_every_s` seconds, as one batch (each
send is a store transaction, which would otherwise cost fast rounds more than their clients' training);
the train flow flushes it before every checkpoint, so whatever a checkpoint holds is in the store too.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.exceptions import TerminationSignal

from fedmef_core.config import ExperimentConfig, TrackingConfig
from fedmef_core.errors import UserError
from fedmef_core.runs import run_paths

# a dead server costs seconds, not MLflow's default minutes of retries (a user's own settings win)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PER_ROUND_METRIC = "train_loss"  # logged every round: its last step is how far a run got
MAX_BATCH_METRICS = 1000  # what one MLflow log_batch call takes


class TrackingUnavailable(UserError):
    """The MLflow tracking store cannot be reached."""


def repository_root(cwd: Path | None = None) -> Path:
    """The repository a command runs for: the working directory, or — inside one of DVC's experiment
    workspaces (``<repo>/.dvc/tmp/exps/...``, where queued experiments run) — the repository itself."""
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(*parts)


def store_uri(uri: str, cwd: Path | None = None) -> str:
    """`uri` with a relative sqlite path made absolute against :func:`repository_root`, so every run —
    queued DVC experiments included — lands in the repository's store."""
    if not uri.startswith("sqlite:///"):
        return uri
    path = Path(uri.removeprefix("sqlite:///"))
    return uri if path.is_absolute() else f"sqlite:///{repository_root(cwd) / path}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database, in `mlartifacts/`."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe_server(uri: str, timeout: float) -> None:
    """GET the server's /health, with basic auth from MLflow's own variables when they are set."""
    request = urllib.request.Request(uri.rstrip("/") + "/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user or password:
        token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    urllib.request.urlopen(request, timeout=timeout).close()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # outside a flow run
        return ""


class Tracker:
    """Logs to one MLflow run; a disabled tracker accepts every call and does nothing.

    Metrics are held back and sent as one batch once `send_every_s` seconds have passed since the last send
    (0: at once), or at :meth:`flush`. What the store refuses mid-run waits in `pending` (in order) and is
    sent again at the next send and at :meth:`end`. After :meth:`reopen`, steps the run already holds are
    not logged again."""

    def __init__(self, cfg: TrackingConfig, run_id: str | None = None, send_every_s: float = 0.0):
        self.cfg = cfg
        self.run_id = run_id
        self.uri = store_uri(cfg.mlflow_uri)
        self._client = None
        self.pending: list[tuple[tuple[str, str], Callable[[], Any]]] = []  # ((kind, what), call)
        self.send_every_s = send_every_s
        self._held: list[Any] = []  # metrics (mlflow Metric) not yet handed to `pending`
        self._last_send = float("-inf")
        self.offline = False
        self._logged_through, self._logged_keys = -1, frozenset()  # what a resumed run already holds
        if cfg.enabled:
            from mlflow.tracking import MlflowClient

            if is_server(self.uri):
                for name, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            self._client = MlflowClient(tracking_uri=self.uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast, naming the URI, instead of MLflow's long retry loop on a dead server."""
        if self._client is None:
            return
        try:
            if is_server(self.uri):
                probe_server(self.uri, timeout)
            self._client.search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {self.uri!r} is unreachable ({type(exc).__name__}: {exc}); "
                "fix tracking.mlflow_uri or set tracking.enabled: false"
            ) from None

    def _experiment_id(self, create: bool) -> str | None:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        return self._client.create_experiment(self.cfg.experiment, artifact_location=artifact_root(self.uri))

    def start(self, config: ExperimentConfig, run_name: str, tags: dict[str, str] | None = None) -> str:
        """Create the run, log the flattened config as params, and return its id."""
        if self._client is None:
            return ""
        from mlflow.entities import Param

        self.check_reachable()
        all_tags = {
            "git_commit": git_commit(),
            "prefect_flow_run_id": prefect_flow_run_id(),
            "dvc_stage": os.environ.get("DVC_STAGE", ""),
            "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
            "method": config.pruning.method,
            "density": f"{config.pruning.density:g}",
            "seed": str(config.federation.seed),
            **(tags or {}),
        }
        run = self._client.create_run(self._experiment_id(create=True), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in config.flat().items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def knows(self, run_id: str) -> bool:
        """Whether the store holds `run_id` (a moved or fresh store does not)."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def end_orphans(self, run_dir: str) -> list[str]:
        """Mark KILLED the runs of `run_dir` still RUNNING: left by a training that died (``kill -9``) before
        its first checkpoint named its run. The caller holds the folder's lock, so none is alive."""
        exp_id = self._experiment_id(create=False)
        if exp_id is None:
            return []
        running = self._client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
        orphans = [r.info.run_id for r in running if r.data.tags.get("run_dir") == run_dir]
        for orphan in orphans:
            self._client.set_terminated(orphan, status="KILLED")
            print(f"MLflow run {orphan} of {run_dir} was left RUNNING by a training that died: marked KILLED",
                  flush=True)
        return orphans

    def reopen(self) -> None:
        """Continue an existing run (after a resume) instead of forking a new one; remember how far it got,
        so the rounds re-run from the checkpoint (bit-identical) are not logged twice."""
        if self._client is None or not self.run_id:
            return
        self.check_reachable()
        self._client.update_run(self.run_id, status="RUNNING")
        self.set_tags({"prefect_flow_run_id": prefect_flow_run_id()})  # the flow run doing the work now
        history = self._client.get_metric_history(self.run_id, PER_ROUND_METRIC)
        self._logged_through = max((m.step for m in history), default=-1)
        self._logged_keys = frozenset(self._client.get_run(self.run_id).data.metrics)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is None or not self.run_id:
            return
        from mlflow.entities import Metric

        step = step or 0
        if step <= self._logged_through:  # a re-run round: only what the run does not hold yet
            metrics = {k: v for k, v in metrics.items() if k not in self._logged_keys}
        now = int(time.time() * 1000)
        self._held += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self._last_send >= self.send_every_s:
            self.flush()

    def flush(self) -> None:
        """Send the metrics held back, and try again what an outage kept, now."""
        if self._client is None or not self.run_id:
            return
        self._last_send = time.monotonic()
        self._hand_held_to_pending()
        self._flush()

    def _hand_held_to_pending(self) -> None:
        for i in range(0, len(self._held), MAX_BATCH_METRICS):
            chunk = self._held[i : i + MAX_BATCH_METRICS]
            steps = ",".join(str(step) for step in dict.fromkeys(m.step for m in chunk))
            self.pending.append((("metrics", steps), functools.partial(self._client.log_batch, self.run_id,
                                                                       metrics=chunk)))
        self._held = []

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._client is None or not self.run_id:
            return
        for k, v in tags.items():
            self._send(("tag", k), functools.partial(self._client.set_tag, self.run_id, k, str(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is None or not self.run_id:
            return
        where = str(Path(artifact_path or "") / Path(path).name)
        self._send(("artifact", where),
                   functools.partial(self._client.log_artifact, self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        """`text` as the artifact `artifact_file` (kept in memory while the store is away)."""
        if self._client is None or not self.run_id:
            return
        self._send(("artifact", artifact_file),
                   functools.partial(self._client.log_text, self.run_id, text, artifact_file))

    def end(self, status: str = "FINISHED") -> None:
        """End the run with `status`; say what could not be logged if the store is still away."""
        if self._client is None or not self.run_id:
            return
        self._send(("status", status), functools.partial(self._client.set_terminated, self.run_id, status=status))
        if self.pending:
            print(f"warning: MLflow tracking store {self.uri} is still unreachable; not logged to run "
                  f"{self.run_id}: {describe_lost([what for what, _ in self.pending])} (the run folder's "
                  "metrics and checkpoints have everything)", flush=True)

    def _send(self, what: tuple[str, str], call: Callable[[], Any]) -> None:
        """Queue `call` behind anything still pending; try to send now — while the store is away, only
        the metrics' sends and the end try again, so an outage costs seconds, not minutes."""
        self._hand_held_to_pending()  # in the order they were logged
        self.pending.append((what, call))
        if not self.offline or what[0] == "status":
            self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                with quiet_retries():
                    self.pending[0][1]()
            except Exception as exc:  # whatever the store or the network raised: tracking never stops training
                if not self.offline:
                    print(f"warning: MLflow tracking store {self.uri} failed ({short(exc)}); training goes on, "
                          "the run's logs wait in memory and are sent when it is back", flush=True)
                self.offline = True
                return
            self.pending.pop(0)
        if self.offline:
            print(f"MLflow tracking store {self.uri} is back: run {self.run_id} caught up", flush=True)
            self.offline = False


@contextmanager
def quiet_retries() -> Iterator[None]:
    """No urllib3 line per retry: the tracker reports an outage itself, once."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def short(exc: Exception, limit: int = 160) -> str:
    """`Type: first line of the message`, cut at a word to about `limit` characters."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def describe_lost(lost: list[tuple[str, str]]) -> str:
    """``metrics of steps 2, 3; artifacts plots/a.png; its end (FINISHED: ...)`` from (kind, what) pairs."""
    steps = sorted({int(step) for k, w in lost if k == "metrics" for step in w.split(",")})
    parts = [f"metrics of steps {', '.join(map(str, steps))}"] if steps else []
    for kind, label in (("artifact", "artifacts"), ("tag", "tags")):
        if names := [w for k, w in lost if k == kind]:
            parts.append(f"{label} {', '.join(dict.fromkeys(names))}")
    parts += [f"its end ({w}: the store shows it RUNNING)" for k, w in lost if k == "status"]
    return "; ".join(parts)


@contextmanager
def tracked_run(config: ExperimentConfig, run_name: str, run_id: str | None = None,
                tags: dict[str, str] | None = None, send_every_s: float = 0.0) -> Iterator[Tracker]:
    """The training's MLflow run (see :func:`open_run`), ended on every way out: FINISHED, KILLED on an
    interrupt or Prefect's termination signal (SIGTERM), FAILED on an error. Metrics: see :class:`Tracker`."""
    tracker = Tracker(config.tracking, run_id=run_id, send_every_s=send_every_s)
    open_run(tracker, config, run_name, tags)
    with ended(tracker):
        yield tracker


@contextmanager
def ended(tracker: Tracker) -> Iterator[Tracker]:
    """End `tracker`'s run on every way out: FINISHED, KILLED on Ctrl-C or Prefect's termination signal
    (SIGTERM inside a flow run), FAILED on an error."""
    try:
        yield tracker
    except (KeyboardInterrupt, TerminationSignal):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()


def open_run(tracker: Tracker, config: ExperimentConfig, run_name: str, tags: dict[str, str] | None) -> None:
    """Continue the checkpoint's run (`tracker.run_id`); else start one tagged with the run folder, after
    marking KILLED the runs a dead training left RUNNING there (tag `restarts`). A checkpoint's run the store
    does not know (a moved store, a fresh clone) continues in a new run, tagged `continues_run`."""
    if not tracker.enabled:
        return
    tracker.check_reachable()
    if tracker.run_id and tracker.knows(tracker.run_id):
        tracker.reopen()
        return
    run_dir = str(run_paths(config).root.resolve())
    lineage = {"run_dir": run_dir}
    if orphans := tracker.end_orphans(run_dir):
        lineage["restarts"] = ",".join(orphans)
    lost_run = tracker.run_id
    if lost_run:
        lineage["continues_run"] = lost_run
    tracker.start(config, run_name=run_name, tags={**(tags or {}), **lineage})
    if lost_run:
        print(f"MLflow run {lost_run} (named by the checkpoint) is not in {tracker.uri}: this resume logs to "
              f"a new run {tracker.run_id}, tagged continues_run={lost_run}", flush=True)
