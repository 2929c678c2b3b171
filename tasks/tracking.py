"""MLflow tracking: one run per training, addressed by id (no global "active run")."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.exceptions import TerminationSignal

from fedmef_core.config import ExperimentConfig, TrackingConfig
from fedmef_core.errors import UserError


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
    """Logs to one MLflow run; a disabled tracker accepts every call and does nothing."""

    def __init__(self, cfg: TrackingConfig, run_id: str | None = None):
        self.cfg = cfg
        self.run_id = run_id
        self._client = None
        if cfg.enabled:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=store_uri(cfg.mlflow_uri))

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast, naming the URI, instead of MLflow's long retry loop on a dead server."""
        if self._client is None:
            return
        uri = self.cfg.mlflow_uri
        try:
            if uri.startswith(("http://", "https://")):
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
            self._client.search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {uri!r} is unreachable ({type(exc).__name__}: {exc}); "
                "fix tracking.mlflow_uri or set tracking.enabled: false"
            ) from None

    def start(self, config: ExperimentConfig, run_name: str, tags: dict[str, str] | None = None) -> str:
        """Create the run, log the flattened config as params, and return its id."""
        if self._client is None:
            return ""
        from mlflow.entities import Param

        self.check_reachable()
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self._client.create_experiment(
                self.cfg.experiment, artifact_location=artifact_root(store_uri(self.cfg.mlflow_uri))
            )
        )
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
        run = self._client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in config.flat().items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def reopen(self) -> None:
        """Continue an existing run (after a resume) instead of forking a new one."""
        if self._client is None or not self.run_id:
            return
        self.check_reachable()
        self._client.update_run(self.run_id, status="RUNNING")
        self.set_tags({"prefect_flow_run_id": prefect_flow_run_id()})  # the flow run doing the work now

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is None or not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._client is None or not self.run_id:
            return
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is None or not self.run_id:
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._client is None or not self.run_id:
            return
        self._client.set_terminated(self.run_id, status=status)


@contextmanager
def tracked_run(config: ExperimentConfig, run_name: str, run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """The training's MLflow run: continued when `run_id` is given (a resume), else created; ended on
    every way out — FINISHED, KILLED on an interrupt, FAILED on an error."""
    tracker = Tracker(config.tracking, run_id=run_id)
    if tracker.run_id:
        tracker.reopen()
    else:
        tracker.start(config, run_name=run_name, tags=tags)
    try:
        yield tracker
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, or SIGTERM inside a Prefect flow run
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
