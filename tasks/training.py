"""The train stage: the shared round loop, with client updates as Prefect tasks and MLflow tracking."""

from __future__ import annotations

import csv
import io
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedmef_core.algorithms import ClientResult
from fedmef_core.checkpoint import FINAL_NAME, load_checkpoint, save_checkpoint
from fedmef_core.client import Broadcast, run_client
from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, load_partition
from fedmef_core.device import resolve_device
from fedmef_core.engine import ClientExecutor, Server, run_rounds
from fedmef_core.io import write_json, write_text
from fedmef_core.plots import plot_round_curves
from tasks.partitioning import partition_plot_path
from tasks.tracking import Tracker

ROUND_COLUMNS = ("round", "accuracy", "loss", "train_loss", "lr")


@lru_cache(maxsize=4)
def _partition(directory: str, mtime_ns: int):
    return load_partition(directory)


def cached_partition(directory: str):
    """Load the partition once per process (per version of the file)."""
    path = Path(directory) / "clients.json"
    return _partition(directory, path.stat().st_mtime_ns if path.exists() else 0)


@task(name="client-update", cache_policy=NO_CACHE, task_run_name="round-{rnd}-client-{client_id}")
def client_update(config: ExperimentConfig, broadcast_path: str, rnd: int, client_id: int, out_dir: str) -> str:
    """Train one client from the broadcast file; write its update and return the file's path.

    Workers load their own shard from the partition files: only paths cross the task boundary.
    """
    train, _ = load_dataset(config.data)
    indices = cached_partition(config.runtime.partitions_dir)[client_id]
    broadcast = Broadcast.from_dict(load_checkpoint(broadcast_path))
    result = run_client(config, broadcast, client_id, train, indices, resolve_device(config.runtime.device))
    path = Path(out_dir) / f"update_r{rnd:04d}_c{client_id:04d}.pt"
    save_checkpoint(path, result.to_dict())
    return str(path)


def prefect_executor(config: ExperimentConfig, exchange_dir: Path) -> ClientExecutor:
    """Submit the round's client updates as tasks, `runtime.workers` at a time."""

    def execute(broadcast: Broadcast, clients: list[int]) -> list[ClientResult]:
        bpath = exchange_dir / f"broadcast_r{broadcast.round:04d}.pt"
        save_checkpoint(bpath, broadcast.to_dict())
        paths: list[str] = []
        wave = config.runtime.workers
        for i in range(0, len(clients), wave):
            futures = [
                client_update.submit(config, str(bpath), broadcast.round, c, str(exchange_dir))
                for c in clients[i : i + wave]
            ]
            paths.extend(f.result() for f in futures)
        results = [ClientResult.from_dict(load_checkpoint(p)) for p in paths]
        for p in [bpath, *map(Path, paths)]:
            p.unlink(missing_ok=True)
        return results

    return execute


def _rounds_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROUND_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        if "accuracy" in row:
            writer.writerow({k: row.get(k, "") for k in ROUND_COLUMNS})
    return buf.getvalue()


def _eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def run_training(config: ExperimentConfig, run_name: str = "train") -> dict:
    """Run every round; write checkpoints, `metrics/train.json`, `metrics/rounds.csv` and plots."""
    rt = config.runtime
    device = resolve_device(rt.device)
    train, test = load_dataset(config.data)
    parts = cached_partition(rt.partitions_dir)
    server = Server(config, train, test, parts, device)
    tracker = Tracker(config.tracking)
    tracker.start(config, run_name=run_name)
    metrics_dir, plots_dir = Path(rt.metrics_dir), Path(rt.plots_dir)
    total = config.federation.rounds
    started = time.perf_counter()

    def on_round(rnd: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "round"}, step=rnd)
        write_text(metrics_dir / "rounds.csv", _rounds_csv(server.history))
        elapsed = time.perf_counter() - started
        acc = f"acc {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}" if "accuracy" in metrics else ""
        print(
            f"round {rnd:>4}/{total}  {acc}  train_loss {metrics['train_loss']:.4f}  "
            f"{metrics['round_seconds']:.1f}s  ETA {_eta(elapsed / rnd * (total - rnd))}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="fedmef-exchange-") as exchange:
        try:
            history = run_rounds(
                server,
                prefect_executor(config, Path(exchange)),
                checkpoint_dir=rt.checkpoints_dir,
                on_round=on_round,
                checkpoint_extra=lambda: {"mlflow_run_id": tracker.run_id or ""},
            )
        except BaseException:
            tracker.end("FAILED")
            raise
        seconds = time.perf_counter() - started
        final = history[-1]
        summary = {
            "accuracy": final["accuracy"],
            "loss": final["loss"],
            "rounds": total,
            "seconds": round(seconds, 2),
            "seconds_per_round": round(seconds / total, 3),
            "method": config.pruning.method,
            "mlflow_run_id": tracker.run_id or "",
        }
        write_json(metrics_dir / "train.json", summary)
        plot_round_curves(
            server.history, plots_dir / "accuracy.png", title=f"{config.pruning.method} on {config.data.name}"
        )
        tracker.log_metrics({"final_accuracy": final["accuracy"], "train_seconds": seconds}, step=total)
        config_file = Path(exchange) / "config.yaml"
        config_file.write_text(config.to_yaml())
        for path, where in [
            (config_file, None),
            (partition_plot_path(config), "plots"),
            (plots_dir / "accuracy.png", "plots"),
            (metrics_dir / "rounds.csv", None),
            (Path(rt.checkpoints_dir) / FINAL_NAME, "checkpoints"),
        ]:
            if path.exists():
                tracker.log_artifact(path, where)
    tracker.end()
    return summary


def load_final_model(config: ExperimentConfig):
    """The trained global model from `checkpoints/final.pt`, plus the checkpoint dict."""
    from fedmef_core.models import build_model

    ckpt = load_checkpoint(Path(config.runtime.checkpoints_dir) / FINAL_NAME)
    train, _ = load_dataset(config.data)
    model = build_model(config.model, train.images.shape[1], train.num_classes, train.images.shape[-1])
    model.load_state_dict(ckpt["model"])
    return model, ckpt
