"""One experiment = one run folder: its name, its paths, and a lock so two processes never share it.

A training writes its checkpoints, metrics and plots under ``runtime.run_dir`` (the ``*_dir`` settings are
relative to it). ``null`` gives every experiment its own folder, ``runs/<name>``, named after what decides
its results (method, density, seed and a digest of the whole identity): two different experiments never
touch each other, and the same experiment started again finds its own checkpoints and resumes. The DVC
stages pass ``runtime.run_dir=.`` so the pipeline keeps its fixed output paths. The output folders
(``checkpoints_dir``, ``metrics_dir``, ``plots_dir``) must lie inside the run folder, under its lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedmef_core.config import ConfigError, ExperimentConfig
from fedmef_core.errors import UserError
from fedmef_core.io import NUMBER, read_record, write_json

RUNS_ROOT = "runs"
LOCK_NAME = ".fedmef-run.lock"


class RunBusy(UserError):
    """Another process is writing the same run folder."""


def identity_digest(config: ExperimentConfig, length: int = 8) -> str:
    """A short, stable digest of what determines the results (not where or how the run executes)."""
    text = json.dumps(config.identity(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_name(config: ExperimentConfig) -> str:
    """``<method>-<arch>-d<density>-s<seed>-<digest>``: readable in MLflow and a folder name."""
    p = config.pruning
    return f"{p.method}-{config.model.arch}-d{p.density:g}-s{config.federation.seed}-{identity_digest(config)}"


@dataclass(frozen=True)
class RunPaths:
    root: Path
    checkpoints: Path
    metrics: Path
    plots: Path

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME


OUTPUT_SETTINGS = ("checkpoints_dir", "metrics_dir", "plots_dir")


def run_paths(config: ExperimentConfig) -> RunPaths:
    """The run folder and its output folders. Each output folder must lie inside the run folder, so the run
    lock covers every file the experiment writes; one outside it (an absolute path elsewhere, or ``..``)
    could be shared by two experiments that would then overwrite each other's files: refused."""
    rt = config.runtime
    root = Path(rt.run_dir) if rt.run_dir is not None else Path(RUNS_ROOT) / run_name(config)
    outputs = [root / getattr(rt, key) for key in OUTPUT_SETTINGS]
    inside = root.resolve()
    for key, folder in zip(OUTPUT_SETTINGS, outputs):
        if not folder.resolve().is_relative_to(inside):
            raise ConfigError(
                f"runtime.{key} ({getattr(rt, key)}) is outside the run folder {root}, where the run's lock does "
                "not cover it: another experiment could write the same files. Give a path relative to the run "
                f"folder (e.g. runtime.{key}={Path(getattr(rt, key)).name}), or move the whole run with "
                "runtime.run_dir"
            )
    return RunPaths(root, *outputs)


# what the run's metrics files hold (at least), checked wherever they are read back
TRAIN_RECORD = {"accuracy": NUMBER, "loss": NUMBER, "rounds": int, "method": str}
EVAL_RECORD = {"accuracy": NUMBER, "loss": NUMBER, "round": int}
# `run.json`: the facts of the training that wrote the folder's checkpoints, which change between identical runs
# and so stay out of `train.json` and the checkpoints (DVC outputs, hashed in dvc.lock): the MLflow run, then
# at its end the time it took, the rounds this process ran and the registered model
RUN_FACTS = "run.json"
RUN_RECORD = {"identity": str, "partition": str, "mlflow_run_id": str}
FINISHED_RECORD = {**RUN_RECORD, "rounds_run": int, "seconds": NUMBER, "seconds_per_round": NUMBER, "model_uri": str}
RERUN_TRAINING = "re-run the training (`python -m flows.train` or `dvc repro train`) to write it again"


def read_train_metrics(paths: RunPaths) -> dict:
    """`train.json` of a finished training; :class:`InvalidFile` if it does not hold what training writes."""
    return read_record(paths.metrics / "train.json", TRAIN_RECORD, RERUN_TRAINING)


def run_facts(config: ExperimentConfig, partition: str, mlflow_run_id: str) -> dict:
    """What names a training beside its checkpoints: its experiment, its split (`partition`, the
    :func:`~fedmef_core.data.split_digest`) and its MLflow run ("" with tracking off)."""
    return {"identity": identity_digest(config, length=64), "partition": partition, "mlflow_run_id": mlflow_run_id}


def write_run_facts(paths: RunPaths, facts: dict) -> None:
    write_json(paths.metrics / RUN_FACTS, facts)


def read_run_facts(paths: RunPaths, config: ExperimentConfig, partition: str | None = None,
                   finished: bool = False) -> dict | None:
    """`run.json` if a training of `config` (on `partition`, if given) wrote it, with its end's facts if
    `finished`; None if there is none (e.g. outputs from `dvc pull`), or it is another experiment's or unfinished.
    :class:`InvalidFile` if it does not hold what training writes."""
    path = paths.metrics / RUN_FACTS
    try:
        facts = read_record(path, RUN_RECORD, RERUN_TRAINING)
    except FileNotFoundError:
        return None
    mine = facts["identity"] == identity_digest(config, length=64) and partition in (None, facts["partition"])
    if not mine or (finished and not FINISHED_RECORD.keys() <= facts.keys()):
        return None
    return read_record(path, FINISHED_RECORD, RERUN_TRAINING) if finished else facts


def read_eval_metrics(paths: RunPaths) -> dict:
    """`eval.json` of an evaluated run; :class:`InvalidFile` if it does not hold what evaluation writes."""
    return read_record(paths.metrics / "eval.json", EVAL_RECORD,
                       "re-run the evaluation (`python -m flows.evaluate` or `dvc repro evaluate`) to write it again")


@contextmanager
def run_lock(paths: RunPaths) -> Iterator[None]:
    """Hold the run folder for this process; a second holder is refused with a clear message.

    An OS file lock: it is released when the process ends, however it ends (``kill -9`` included), so a
    crashed run never blocks the next one.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(paths.lock).read_text().strip() or "another process"
            raise RunBusy(
                f"{paths.root} is being written by another training ({holder}); wait for it to finish, or give "
                "this run its own folder with runtime.run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock
