"""MLflow tracking: one run per training, addressed by id (no global "active run").

The store is checked before any work (a wrong or dead URI is one message). Once a run is open, tracking
never stops a training: an outage mid-run prints one warning, the tracker keeps what it could not send in
memory and sends it at the next round's metrics or at the end, where it says what was lost, if anything.

Every run says what it is: the experiment is tagged for MLflow's model-training view, a training's run gets a
description (method, architecture, density, seed, and at the end its accuracy), its partition as the run's
dataset input and, with `tracking.system_metrics`, MLflow's system metrics. The trained model itself goes to
MLflow through :mod:`.logged_models`.

A training's tracker sends its per-round metrics at most every `send_every_s` seconds, as one batch (each
send is a store transaction, which would otherwise cost fast rounds more than their clients' training);
the train flow flushes it before every checkpoint, so whatever a checkpoint holds is in the store too.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import sqlite3
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
SQLITE_PROBE_S = 2.0  # how long a send waits for a locked local store (MLflow itself waits 20 s per call)
OFFLINE_RETRY_S = 10.0  # while the store is away, sends try again at most this often (the run's end always)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens its model-training view
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)
MAX_TAG_LENGTH = 8000  # what MLflow stores of a tag's value
MAX_DIGEST_LENGTH = 36  # what MLflow stores of a dataset's digest


class TrackingUnavailable(UserError):
    """The MLflow tracking store cannot be reached."""


class TrackingRefused(UserError):
    """The store answered and refused a request (a bad name or value): a bug, reported at once, never retried."""


class FilterValueError(UserError, ValueError):
    """Text that no MLflow search filter can hold (both quote characters)."""


def filter_value(text: str) -> str:
    """`text` as a string literal of an MLflow search filter (``tags.sweep = {filter_value(name)}``) — the one
    place user text enters a filter. MLflow has no escape inside a literal: it takes what lies between the
    quotes as it is, and a literal may be quoted with ``'`` or ``"``. So text without ``'`` is single-quoted,
    text with ``'`` double-quoted, and text holding both cannot be searched for: a :class:`FilterValueError`."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise FilterValueError(f"{text!r} holds both quote characters (' and \"), which no MLflow search can match; "
                           "leave one of them out")


# what MLflow says when it refuses a request (HTTP 4xx) and trying again cannot help; too many requests (429)
# and a timeout (408) are an outage like a 5xx
NOT_REFUSALS = {408, 429}


def refused(exc: BaseException) -> bool:
    """Whether `exc` is the store refusing a request — a bad name or value, an unknown or deleted run — rather
    than a store that is away (a connection error, a 5xx, a locked sqlite file)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in NOT_REFUSALS


def refusal(uri: str, exc: BaseException, what: str = "a request", mid_run: bool = False) -> str:
    """One line for a request the store at `uri` refused (`mid_run`: the run's own logging)."""
    kept = (" The run folder keeps its last checkpoint and metrics, and the MLflow run is marked FAILED"
            if mid_run else "")
    return f"MLflow tracking store {uri} refused {what} ({short(exc, 300)}); this is a bug: please report this line." \
        + kept


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
    not logged again. `clock` (seconds, only differences count) times the sends and the retries."""

    def __init__(self, cfg: TrackingConfig, run_id: str | None = None, send_every_s: float = 0.0, *,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self._clock = clock
        self.run_id = run_id
        self.uri = store_uri(cfg.mlflow_uri)
        self._client = None
        self.pending: list[tuple[tuple[str, str], Callable[[], Any]]] = []  # ((kind, what), call)
        self.send_every_s = send_every_s
        self._held: list[Any] = []  # metrics (mlflow Metric) not yet handed to `pending`
        self._last_send = self._last_try = float("-inf")
        self.offline = False
        self.refused: list[tuple[str, str]] = []  # what the store refused at the end (already said once)
        self._logged_through, self._logged_keys = -1, frozenset()  # what a resumed run already holds
        self._monitor = None  # MLflow's system metrics thread, while one runs
        self.model_logged: Any = None  # what :meth:`log_model` returned, once sent
        if cfg.enabled:
            from mlflow.tracking import MlflowClient

            if is_server(self.uri):
                for name, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            with store_failures(self.uri):
                self._client = MlflowClient(tracking_uri=self.uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast, naming the URI and what to do: a dead server (instead of MLflow's long retry loop), a
        damaged or read-only local store, an experiment deleted in the MLflow UI."""
        if self._client is None:
            return
        with store_failures(self.uri):
            if is_server(self.uri):
                probe_server(self.uri, timeout)
            else:
                probe_sqlite_write(self.uri)
            self._client.search_experiments(max_results=1)
            self.experiment_id(create=False)  # refuses a deleted one

    def experiment_id(self, create: bool) -> str | None:
        """The experiment's id (None if it does not exist and `create` is false). Created, or found without it,
        with `create`: tagged as a model-training experiment, so the MLflow UI opens its runs, models and
        charts (not the GenAI traces view)."""
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise TrackingUnavailable(
                f"MLflow experiment {self.cfg.experiment!r} was deleted (it is in the store's trash, and MLflow "
                f"logs no run to it): restore it with `MLFLOW_TRACKING_URI={self.uri} mlflow experiments restore "
                f"--experiment-id {exp.experiment_id}`, or set tracking.experiment to another name"
            )
        if exp is not None:
            if create and EXPERIMENT_KIND[0] not in exp.tags:  # one made before, or by another tool
                self._client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        if not create:
            return None
        return self._client.create_experiment(self.cfg.experiment, artifact_location=artifact_root(self.uri),
                                              tags=dict([EXPERIMENT_KIND]))

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
            DESCRIPTION_TAG: run_description(config),
            **(tags or {}),
        }
        run = self._client.create_run(self.experiment_id(create=True), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in config.flat().items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def continue_or_start(self, run_name: str, match: dict[str, str], tags: dict[str, str],
                          params: dict[str, str]) -> str:
        """The newest run named `run_name` whose tags hold `match`, set RUNNING again; else a new one with `tags`
        and `params`. Its id (e.g. a sweep's parent run, found again by a re-run of the same sweep)."""
        from mlflow.entities import Param

        exp_id = self.experiment_id(create=True)
        wanted = " and ".join([f"tags.`{k}` = {filter_value(v)}" for k, v in match.items()]
                              + [f"attributes.run_name = {filter_value(run_name)}"])
        found = self._client.search_runs([exp_id], wanted, max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self._client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self._client.create_run(exp_id, run_name=run_name, tags=tags)
        self._client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id

    def lost(self, run_id: str) -> str | None:
        """Why `run_id` cannot be continued — ``"is not in"`` the store (a moved or fresh store) or ``"was
        deleted from"`` it (in the MLflow UI) — or None if it can."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "is not in"
            raise
        return "was deleted from" if run.info.lifecycle_stage == "deleted" else None

    def end_orphans(self, run_dir: str) -> list[str]:
        """Mark KILLED the runs of `run_dir` still RUNNING: left by a training that died (``kill -9``) before
        its first checkpoint's `run.json` named its run. The caller holds the folder's lock, so none is alive."""
        exp_id = self.experiment_id(create=False)
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
        if self._clock() - self._last_send >= self.send_every_s:
            self.flush()

    def flush(self) -> None:
        """Send the metrics held back, and try again what an outage kept, now."""
        if self._client is None or not self.run_id:
            return
        self._last_send = self._clock()
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

    def describe(self, markdown: str) -> None:
        """The run's description in the MLflow UI (cut at a line to what MLflow stores)."""
        if len(markdown) > MAX_TAG_LENGTH:
            cut = "\n\n(cut here: the whole text is in the run's artifacts)"
            markdown = markdown[: MAX_TAG_LENGTH - len(cut)].rsplit("\n", 1)[0] + cut
        self.set_tags({DESCRIPTION_TAG: markdown})

    def log_partition(self, config: ExperimentConfig, digest: str, sizes: list[int]) -> None:
        """The clients' partition as the run's dataset input (context ``training``): named after the data and the
        scheme, its digest the partition's own (:func:`fedmef_core.data.split_digest`, cut to the 36 characters
        MLflow stores; the whole sha256 is in its profile), its source the partition's ``clients.json``. Logging
        it again (a resumed run) adds nothing."""
        if self._client is None or not self.run_id:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = (Path(config.runtime.partitions_dir) / "clients.json").resolve().as_uri()
        profile = {"clients": len(sizes), "samples": sum(sizes), "partition_sha256": digest,
                   "scheme": config.partition.scheme, "seed": config.partition.seed}
        dataset = Dataset(name=f"{config.data.name}-{config.partition.scheme}", digest=digest[:MAX_DIGEST_LENGTH],
                          source_type="local", source=json.dumps({"uri": source}), profile=json.dumps(profile))
        data_input = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])
        self._send(("input", dataset.name), functools.partial(self._client.log_inputs, self.run_id, [data_input]))

    def log_model(self, log: Callable[[str, str], Any], what: str) -> None:
        """Run ``log(store_uri, run_id)`` — a logged model's whole logging (:mod:`.logged_models`) — as one send: it
        waits, in order, while the store is away. Its result is kept in `model_logged`."""
        if self._client is None or not self.run_id:
            return

        def send() -> None:
            self.model_logged = log(self.uri, self.run_id)

        self._send(("model", what), send)

    def start_system_metrics(self, resumed: bool) -> None:
        """MLflow's system metrics (``system/*``) for this run in a thread of its own, until :meth:`end`; a
        resumed run continues their steps."""
        if self._client is None or not self.run_id or not self.cfg.system_metrics or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()

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
        if self._monitor is not None:  # its last samples go before the run ends
            self._monitor.finish()
            self._monitor = None
        self._send(("status", status), functools.partial(self._client.set_terminated, self.run_id, status=status))
        if self.refused:
            print(f"warning: MLflow tracking store {self.uri} refused, and run {self.run_id} lacks: "
                  f"{describe_lost(self.refused)}", flush=True)
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
            self._flush(force=what[0] == "status")

    def _went_offline(self, exc: Exception) -> None:
        if not self.offline:
            print(f"warning: MLflow tracking store {self.uri} failed ({short(exc)}); training goes on, "
                  "the run's logs wait in memory and are sent when it is back", flush=True)
        self.offline = True

    def _flush(self, force: bool = False) -> None:
        if self.offline and not force and self._clock() - self._last_try < OFFLINE_RETRY_S:
            return  # the store was away a moment ago: a retry at every send would cost each round its wait
        self._last_try = self._clock()
        if self.pending and self.uri.startswith("sqlite:///"):
            try:  # a locked local store: a short probe instead of MLflow's 20 s wait on each call while it lasts
                probe_sqlite_write(self.uri, timeout=SQLITE_PROBE_S)
            except Exception as exc:  # noqa: BLE001 - whatever keeps it from being written: an outage
                self._went_offline(exc)
                return
        while self.pending:
            try:
                with quiet_retries():
                    self.pending[0][1]()
            except Exception as exc:  # noqa: BLE001 - a refusal is a bug; anything else an outage, retried
                if not refused(exc):  # whatever the store or the network raised: tracking never stops training
                    self._went_offline(exc)
                    return
                what = self.pending.pop(0)[0]
                if force:  # the run's end: send the rest, say what was refused
                    self.refused.append(what)
                    continue
                raise TrackingRefused(refusal(self.uri, exc, describe_lost([what]), mid_run=True)) from None
            self.pending.pop(0)
        if self.offline:
            print(f"MLflow tracking store {self.uri} is back: run {self.run_id} caught up", flush=True)
            self.offline = False


QUIET_LOGGERS = {"urllib3.connectionpool": logging.ERROR,  # a line per HTTP retry
                 "mlflow.store": logging.CRITICAL}  # a 40-line ERROR traceback per failed database call


@contextmanager
def quiet_retries() -> Iterator[None]:
    """No line per retry or failed call from urllib3 or MLflow's store: the tracker reports a failure itself,
    once, in one line."""
    loggers = {logging.getLogger(name): level for name, level in QUIET_LOGGERS.items()}
    before = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


SQLITE_PROBLEMS = {  # what sqlite says -> what it means for the user, and the fix
    ("file is not a database", "malformed", "file is encrypted"): (
        "is damaged ({why}); move {db} aside (a new, empty store is then made there) or set tracking.mlflow_uri "
        "to another store"),
    ("readonly database", "read-only file system", "unable to open database file", "permission denied"): (
        "cannot be written ({why}); make {db} and its folder writable, or set tracking.mlflow_uri to a store "
        "you can write"),
    ("database is locked", "database table is locked"): (
        "is locked by another process ({why}); wait for it to finish, or set tracking.mlflow_uri to another store"),
}


def store_problem(uri: str, exc: BaseException) -> str:
    """One line for a failure of the store at `uri`: what it is and what to do."""
    causes, seen, cause = [], set(), exc
    while cause is not None and id(cause) not in seen:  # sqlite's own words are in the chain MLflow wraps
        seen.add(id(cause))
        causes.append(str(cause).lower())
        cause = cause.__cause__ or cause.__context__
    if uri.startswith("sqlite:///"):
        for phrases, problem in SQLITE_PROBLEMS.items():
            if hit := next((p for p in phrases if p in " ".join(causes)), None):
                return f"MLflow tracking store {uri} " + problem.format(why=hit, db=uri.removeprefix("sqlite:///"))
    return f"MLflow tracking store {uri!r} is unreachable ({short(exc)}); fix tracking.mlflow_uri or set " \
        "tracking.enabled: false"


@contextmanager
def store_failures(uri: str) -> Iterator[None]:
    """Whatever the store at `uri` raises inside (SQLAlchemy, sqlite, HTTP, MLflow) leaves as one
    :class:`TrackingUnavailable` line (see :func:`store_problem`), without MLflow's own tracebacks."""
    try:
        with quiet_retries():
            yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure of an outside store is one message
        if refused(exc):
            raise TrackingRefused(refusal(uri, exc)) from None
        raise TrackingUnavailable(store_problem(uri, exc)) from None


def probe_sqlite_write(uri: str, timeout: float = 5.0) -> None:
    """Raise sqlite's own error if the local store at `uri` cannot be written (a read-only file or file system):
    MLflow's reads succeed there and its first write fails, after the training has started. Nothing is kept."""
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():  # MLflow makes it: its folder must be writable
        folder = db.parent if db.parent.exists() else None
        if folder is not None and not os.access(folder, os.W_OK):
            raise PermissionError(f"permission denied: {folder}")
        return
    connection = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("CREATE TABLE fedmef_write_probe (x)")  # rolled back: the file is never changed
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def short(exc: Exception, limit: int = 160) -> str:
    """`Type: first line of the message`, cut at a word to about `limit` characters."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def describe_lost(lost: list[tuple[str, str]]) -> str:
    """``metrics of steps 2, 3; artifacts plots/a.png; its end (FINISHED: ...)`` from (kind, what) pairs."""
    steps = sorted({int(step) for k, w in lost if k == "metrics" for step in w.split(",")})
    parts = [f"metrics of steps {', '.join(map(str, steps))}"] if steps else []
    for kind, label in (("artifact", "artifacts"), ("tag", "tags"), ("input", "dataset inputs"),
                        ("model", "the model")):
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
    """Continue the checkpoints' run (`tracker.run_id`, named by `run.json`); else start one tagged with the run
    folder, after marking KILLED the runs a dead training left RUNNING there (tag `restarts`). A checkpoint's run
    the store does not know (a moved store, a fresh clone) or that was deleted in the MLflow UI continues in a new
    run, tagged `continues_run`. A failure of the store itself is one :class:`TrackingUnavailable` message."""
    if not tracker.enabled:
        return
    with store_failures(tracker.uri):
        _open_run(tracker, config, run_name, tags)


def _open_run(tracker: Tracker, config: ExperimentConfig, run_name: str, tags: dict[str, str] | None) -> None:
    tracker.check_reachable()
    lost = tracker.lost(tracker.run_id) if tracker.run_id else None
    if tracker.run_id and lost is None:
        tracker.reopen()
        tracker.start_system_metrics(resumed=True)
        return
    run_dir = str(run_paths(config).root.resolve())
    lineage = {"run_dir": run_dir}
    if orphans := tracker.end_orphans(run_dir):
        lineage["restarts"] = ",".join(orphans)
    lost_run = tracker.run_id
    if lost_run:
        lineage["continues_run"] = lost_run
    tracker.start(config, run_name=run_name, tags={**(tags or {}), **lineage})
    tracker.start_system_metrics(resumed=False)
    if lost_run:
        print(f"MLflow run {lost_run} (named by the checkpoints' run.json) {lost} {tracker.uri}: this resume logs to "
              f"a new run {tracker.run_id}, tagged continues_run={lost_run}", flush=True)


def run_description(config: ExperimentConfig, accuracy: float | None = None) -> str:
    """A training run's description (Markdown): what was trained and, once known, how well."""
    p = config.pruning
    text = (f"**{p.method}** · {config.model.arch} ({config.model.norm}) · density {p.density:g} · "
            f"seed {config.federation.seed} · {config.data.name}")
    if accuracy is None:
        return text + f"\n\ntraining {config.federation.rounds} rounds"
    return text + f"\n\nfinal test accuracy **{accuracy:.4f}** after {config.federation.rounds} rounds"
