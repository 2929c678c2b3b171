"""The tiny experiment: real Fashion-MNIST (the first 1,200 training and 500 test images), 6 clients, 3 rounds
of 3 — small enough to train in a second or two on CPU. The tests and the benchmarks start from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, write_partition


def tiny_raw(folder: Path | None = None) -> dict:
    """The tiny experiment as a raw config (change it, then `parse_config`); with `folder`, every output (and
    torchvision's data root) goes inside it."""
    raw = {
        "data": {"name": "fashion_mnist", "train_limit": 1200, "test_limit": 500},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 20, "seed": 1},
        "federation": {
            "num_clients": 6,
            "clients_per_round": 3,
            "rounds": 3,
            "local_epochs": 1,
            "batch_size": 32,
            "lr": 0.05,
            "lr_final": 0.02,
            "seed": 3,
        },
        "pruning": {"method": "fedavg"},  # dense unless a caller says otherwise (params.yaml's default is fedmef)
        "tracking": {"enabled": False},
        "runtime": {"device": "cpu", "checkpoint_every": 1},
    }
    if folder is not None:
        raw["runtime"].update(
            run_dir=str(folder),
            partitions_dir=str(folder / "partitions"),
            checkpoints_dir=str(folder / "checkpoints"),
            metrics_dir=str(folder / "metrics"),
            plots_dir=str(folder / "plots"),
        )
        raw["data"]["root"] = str(folder / "raw")
    return raw


def save_partition_of(config: ExperimentConfig) -> list[np.ndarray]:
    """Split the training set as the partition stage does and save it where the train flow reads it."""
    train, _ = load_dataset(config.data)
    return write_partition(config, train.labels.numpy(), train.num_classes)[0]
