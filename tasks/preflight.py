"""Checks run before a flow starts, so a user mistake is one clear message — not a failed flow run.

Each returns nothing and raises a `UserError` naming the problem and the fix.
"""

from __future__ import annotations

from fedmef_core.checkpoint import FINAL_NAME, load_checkpoint
from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, load_partition, partition_indices, partition_origin
from fedmef_core.device import resolve_device
from fedmef_core.errors import UserError
from fedmef_core.runs import run_paths
from tasks.tracking import Tracker


class MissingInput(UserError):
    """An earlier stage's output is missing or does not match the config."""


def check_dataset(config: ExperimentConfig) -> None:
    load_dataset(config.data)  # cached: the flow reuses what this loads


def check_device(config: ExperimentConfig) -> None:
    resolve_device(config.runtime.device)


def check_partition(config: ExperimentConfig) -> None:
    """The saved split is well formed and was made from this dataset, limit and partition settings."""
    train, _ = load_dataset(config.data)
    try:
        load_partition(config.runtime.partitions_dir, expected=partition_origin(config, train.labels.numpy()))
    except FileNotFoundError as exc:
        raise MissingInput(str(exc)) from None


def check_checkpoint(config: ExperimentConfig) -> None:
    load_checkpoint(run_paths(config).checkpoints / FINAL_NAME)


def for_partition(config: ExperimentConfig) -> None:
    """The split itself is cheap (well under a second): trying it here catches impossible settings."""
    train, _ = load_dataset(config.data)
    partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)


def for_train(config: ExperimentConfig) -> None:
    check_device(config)
    check_dataset(config)
    check_partition(config)
    Tracker(config.tracking).check_reachable()


def for_evaluate(config: ExperimentConfig) -> None:
    check_device(config)
    check_dataset(config)
    check_checkpoint(config)


def for_pipeline(config: ExperimentConfig) -> None:
    check_device(config)
    check_dataset(config)
    Tracker(config.tracking).check_reachable()
