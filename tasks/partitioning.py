"""The partition stage: split the training set among clients, save indices, stats and a heat map (also run by
the train flow when no partition was saved)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, write_partition
from fedmef_core.data.partition import CLIENTS_FILE
from fedmef_core.plots import plot_partition_heatmap


def partition_plot_path(config: ExperimentConfig) -> Path:
    """The heat map lives with the partition it shows (shared by every run that trains on it)."""
    return Path(config.runtime.partitions_dir) / "partition.png"


@task(name="partition-dataset")
def partition_dataset(config: ExperimentConfig) -> dict:
    """Write `clients.json` (with the record of what it was made from), `stats.json` and the heat map;
    return a small summary."""
    train, _ = load_dataset(config.data)
    parts, stats = write_partition(config, train.labels.numpy(), train.num_classes)
    plot_partition_heatmap(stats["histogram"], partition_plot_path(config), class_names=train.class_names)
    sizes = stats["sizes"]
    return {
        "dataset": config.data.name,
        "scheme": config.partition.scheme,
        "num_clients": len(parts),
        "min_size": min(sizes),
        "max_size": max(sizes),
        "mean_label_entropy": stats["mean_label_entropy"],
        "partitions_dir": config.runtime.partitions_dir,
    }


def partition_missing(config: ExperimentConfig) -> bool:
    """`runtime.partitions_dir` holds no saved split (no `clients.json`): the train flow makes it with
    :func:`partition_dataset`, the partition stage's own task (the same files, byte for byte). A split is a
    function of what it records it was made from, checked before any round, so making it is safe; a saved one
    is never replaced, even one made for other settings (training refuses that one)."""
    return not (Path(config.runtime.partitions_dir) / CLIENTS_FILE).exists()

