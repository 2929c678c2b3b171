"""Checks run before a flow starts, so a user mistake is one clear message — not a failed flow run.

Each returns nothing and raises a `UserError` naming the problem and the fix.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, load_partition, partition_indices, partition_origin
from fedmef_core.device import resolve_device
from fedmef_core.devices import read_trace
from fedmef_core.errors import UserError
from fedmef_core.runs import run_paths
from services.tracking.logged_models import find_model, trained_config
from services.tracking.tracker import Tracker
from tasks.checkpoints import load_final_model
from tasks.partitioning import partition_missing


class UnwritableFolder(UserError):
    """An output folder cannot be created or written."""


def check_dataset(config: ExperimentConfig) -> None:
    load_dataset(config.data)  # cached: the flow reuses what this loads


def check_device(config: ExperimentConfig) -> None:
    resolve_device(config.runtime.device)


def check_partition(config: ExperimentConfig) -> None:
    """The saved split is well formed and was made from this dataset, limit and partition settings; where
    none is saved, that the train flow can make it (:func:`tasks.partitioning.partition_missing`)."""
    if partition_missing(config):
        for_partition(config)
        return
    train, _ = load_dataset(config.data)
    load_partition(config.runtime.partitions_dir, expected=partition_origin(config, train.labels.numpy()))


def check_checkpoint(config: ExperimentConfig) -> None:
    """The final checkpoint verifies, holds what training writes and fits the configured model."""
    load_final_model(config, run_paths(config))


def output_folders(config: ExperimentConfig, *settings: str) -> dict[str, Path]:
    """`runtime.<setting>` -> the folder it names, as the flows compute it (the *_dir settings inside
    run_dir; exchange_dir only when set)."""
    rt, paths = config.runtime, run_paths(config)
    where = {
        "run_dir": paths.root, "checkpoints_dir": paths.checkpoints, "metrics_dir": paths.metrics,
        "plots_dir": paths.plots, "partitions_dir": Path(rt.partitions_dir),
        "exchange_dir": Path(rt.exchange_dir) if rt.exchange_dir is not None else None,
    }
    return {s: where[s] for s in settings if where[s] is not None}


def check_folder(folder: Path, setting: str) -> None:
    """`folder` can be created and written (a probe file, removed again), else one :class:`UnwritableFolder`
    line naming `setting` (``runtime.run_dir``, ``--root``) as the fix: before any work, instead of a failure
    after training has started."""
    probe = folder / f".fedmef-probe-{uuid.uuid4().hex}"
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UnwritableFolder(
            f"{setting}: cannot write to {folder} ({exc.strerror or type(exc).__name__}); "
            f"set {setting} to a folder you can write"
        ) from None
    finally:  # and the folders the probe made with it: a run refused later leaves no folder
        for f in made:
            with contextlib.suppress(OSError):
                f.rmdir()


def check_writable(config: ExperimentConfig, *settings: str) -> None:
    """Each of the config's output folders `settings` can be created and written (:func:`check_folder`)."""
    for setting, folder in output_folders(config, *settings).items():
        check_folder(folder, f"runtime.{setting}")


def check_devices(config: ExperimentConfig) -> None:
    """The device trace, when the config names one, gives every client a budget."""
    if config.devices.profile == "trace":
        read_trace(Path(config.devices.trace), config.federation.num_clients)


TRAIN_OUTPUTS = ("run_dir", "checkpoints_dir", "metrics_dir", "plots_dir", "exchange_dir")


def for_partition(config: ExperimentConfig) -> None:
    """The split itself is cheap (well under a second): trying it here catches impossible settings."""
    train, _ = load_dataset(config.data)
    partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    check_writable(config, "partitions_dir")


def for_train(config: ExperimentConfig) -> None:
    check_device(config)
    check_dataset(config)
    check_partition(config)
    check_devices(config)
    check_writable(config, *TRAIN_OUTPUTS)
    Tracker(config.tracking).check_reachable()


def for_evaluate(config: ExperimentConfig, model_uri: str | None = None) -> None:
    """The final checkpoint or, with `model_uri`, that model in MLflow (and the data it was trained on)."""
    check_device(config)
    if model_uri:
        config = trained_config(config, find_model(config.tracking, model_uri))
    check_dataset(config)
    if not model_uri:
        check_checkpoint(config)
    check_writable(config, "metrics_dir", "plots_dir")
    Tracker(config.tracking).check_reachable()  # evaluate logs to the training's run


def for_pipeline(config: ExperimentConfig) -> None:
    check_device(config)
    check_dataset(config)
    check_devices(config)
    check_writable(config, "partitions_dir", *TRAIN_OUTPUTS)
    Tracker(config.tracking).check_reachable()
