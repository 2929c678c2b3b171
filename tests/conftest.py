"""Shared fixtures: a tiny but real experiment (real Fashion-MNIST, a few clients, a few rounds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset, partition_indices, partition_stats, save_partition
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_rounds

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_raw(tmp_path=None) -> dict:
    """A config small enough to train in a second or two on CPU."""
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
        "pruning": {"method": "fedavg"},  # dense unless a test says otherwise (params.yaml's default is fedmef)
        "tracking": {"enabled": False},
        "runtime": {"device": "cpu", "checkpoint_every": 1},
    }
    if tmp_path is not None:
        raw["runtime"].update(
            run_dir=str(tmp_path),
            partitions_dir=str(tmp_path / "partitions"),
            checkpoints_dir=str(tmp_path / "checkpoints"),
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        )
        raw["data"]["root"] = str(tmp_path / "raw")
    return raw


@pytest.fixture
def tiny_config(tmp_path):
    return parse_config(tiny_raw(tmp_path))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def prepare_run(tmp_path: Path, **federation) -> tuple[Path, object]:
    """A tracked tiny config written to params.yaml, with its partition saved (the train flow's inputs)."""
    raw = tiny_raw(tmp_path)
    raw["federation"].update({"rounds": 5, **federation})
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "resume"}
    config = parse_config(raw)
    (tmp_path / "params.yaml").write_text(config.to_yaml())
    train, _ = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    save_partition(
        parts, partition_stats(parts, train.labels.numpy(), train.num_classes), config.runtime.partitions_dir
    )
    return tmp_path / "params.yaml", config


def uninterrupted_metrics(config) -> list[tuple]:
    """(round, accuracy, loss) of the plain in-process loop: the reference every runner must match."""
    train, test = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    history = run_rounds(Server(config, train, test, parts, resolve_device("cpu")))
    return [(h["round"], h["accuracy"], h["loss"]) for h in history]
