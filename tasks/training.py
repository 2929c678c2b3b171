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
from fedmef_core.checkpoint import (
    FINAL_NAME,
    latest_good_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)
from fedmef_core.client import Broadcast, NonFiniteLossError, run_client
from fedmef_core.config import ExperimentConfig, identity_of
from fedmef_core.data import load_dataset, load_partition
from fedmef_core.device import resolve_device
from fedmef_core.engine import ClientExecutor, Server, run_rounds
from fedmef_core.errors import UserError
from fedmef_core.io import write_json, write_text
from fedmef_core.plots import plot_round_curves
from tasks.masks import save_adjusted_masks, write_mask_plots
from tasks.memory import log_memory_report
from tasks.partitioning import partition_plot_path
from tasks.progress import RoundProgress
from tasks.runners import Submit, task_runner
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


class RoundFailedError(UserError):
    """Too few client updates of a round succeeded; the last good checkpoint is kept."""


def _retry_unless_nonfinite(task, task_run, state) -> bool:
    """A NaN/inf loss is deterministic: retrying it would fail the same way."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - when in doubt, retry
        return True
    return not isinstance(exc, NonFiniteLossError)


def prefect_executor(
    config: ExperimentConfig, exchange_dir: Path, dropped: dict[int, int], submit: Submit
) -> ClientExecutor:
    """Submit the round's client updates as tasks, `runtime.workers` at a time.

    A failing update is retried `runtime.client_retries` times, then dropped (counted in `dropped`);
    the round aggregates the clients that succeeded unless fewer than `federation.min_clients` did.
    """
    update = client_update.with_options(
        retries=config.runtime.client_retries, retry_condition_fn=_retry_unless_nonfinite
    )

    def execute(broadcast: Broadcast, clients: list[int]) -> list[ClientResult]:
        rnd = broadcast.round
        bpath = exchange_dir / f"broadcast_r{rnd:04d}.pt"
        save_checkpoint(bpath, broadcast.to_dict())
        paths: list[str] = []
        failures: list[str] = []
        wave = config.runtime.workers
        for i in range(0, len(clients), wave):
            batch = clients[i : i + wave]
            futures = [
                submit(
                    update,
                    {
                        "config": config,
                        "broadcast_path": str(bpath),
                        "rnd": rnd,
                        "client_id": c,
                        "out_dir": str(exchange_dir),
                    },
                )
                for c in batch
            ]
            for c, future in zip(batch, futures):
                try:
                    paths.append(future.result())
                except NonFiniteLossError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any client fault (CUDA OOM included) drops the client
                    failures.append(f"client {c}: {type(exc).__name__}: {exc}")
        dropped[rnd] = len(failures)
        for line in failures:
            print(f"round {rnd}: dropped {line}", flush=True)
        need = config.federation.min_clients
        if len(paths) < need:
            raise RoundFailedError(
                f"round {rnd}: only {len(paths)} of {len(clients)} client updates succeeded "
                f"(federation.min_clients is {need}); the last good checkpoint in "
                f"{config.runtime.checkpoints_dir} is kept. Failures: " + "; ".join(failures)
            )
        results = [ClientResult.from_dict(load_checkpoint(p)) for p in paths]
        for p in [bpath, *map(Path, paths)]:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".sha256").unlink(missing_ok=True)
        return results

    return execute


def _resume_point(config: ExperimentConfig) -> dict | None:
    """The newest good checkpoint written by this same configuration, or None (stale ones are removed)."""
    rt = config.runtime
    identity = config.identity()
    found = None
    if rt.resume:
        found = latest_good_checkpoint(
            rt.checkpoints_dir,
            accept=lambda c: identity_of(c["config"]) == identity,
            on_skip=lambda msg: print(f"checkpoint skipped: {msg}", flush=True),
        )
    if found is None:
        remove_checkpoints(rt.checkpoints_dir)
    return found


def _rounds_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROUND_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        if "accuracy" in row:
            writer.writerow({k: row.get(k, "") for k in ROUND_COLUMNS})
    return buf.getvalue()


def run_training(config: ExperimentConfig, run_name: str = "train") -> dict:
    """Run every round; write checkpoints, `metrics/train.json`, `metrics/rounds.csv` and plots."""
    rt = config.runtime
    device = resolve_device(rt.device)
    train, test = load_dataset(config.data)
    parts = cached_partition(rt.partitions_dir)
    server = Server(config, train, test, parts, device)
    resumed = _resume_point(config)
    run_id = (resumed or {}).get("extra", {}).get("mlflow_run_id") or None
    tracker = Tracker(config.tracking, run_id=run_id)
    if resumed is not None:
        server.restore(resumed)
        print(f"resuming from round {server.round} (checkpoint in {rt.checkpoints_dir})", flush=True)
    fresh = not tracker.run_id
    if fresh:
        tracker.start(config, run_name=run_name)
    else:
        tracker.reopen()
    # the files are stage outputs, so every run writes them; MLflow gets them once, at the start
    log_memory_report(config, server.model, train, device, tracker if fresh else None)
    dropped: dict[int, int] = {}
    metrics_dir, plots_dir = Path(rt.metrics_dir), Path(rt.plots_dir)
    total = config.federation.rounds
    started = time.perf_counter()
    first_round = server.round + 1
    progress = RoundProgress(total, first_round=first_round)

    def on_round(rnd: int, metrics: dict[str, float]) -> None:
        if rnd == 0:  # the method's setup exchange before round 1 (FedTiny's adaptive BN selection)
            tracker.log_metrics(metrics, step=0)
            described = ", ".join(f"{k.rpartition('/')[2]} {v:.4g}" for k, v in metrics.items())
            print(f"setup before round 1: {described}", flush=True)
            return
        metrics["dropped_clients"] = dropped.pop(rnd, 0)
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "round"}, step=rnd)
        write_text(metrics_dir / "rounds.csv", _rounds_csv(server.history))
        save_adjusted_masks(server, rnd, metrics, rt.checkpoints_dir, tracker)
        progress.update(rnd, metrics)

    if rt.exchange_dir:
        Path(rt.exchange_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedmef-exchange-", dir=rt.exchange_dir) as exchange:
        try:
            with task_runner(config) as submit:
                history = run_rounds(
                    server,
                    prefect_executor(config, Path(exchange), dropped, submit),
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
            "seconds_per_round": round(seconds / max(total - first_round + 1, 1), 3),  # rounds run here
            "method": config.pruning.method,
            "mlflow_run_id": tracker.run_id or "",
        }
        write_json(metrics_dir / "train.json", summary)
        plot_round_curves(
            server.history, plots_dir / "accuracy.png", title=f"{config.pruning.method} on {config.data.name}"
        )
        write_mask_plots(server, plots_dir, tracker, title=f"{config.pruning.method} d={config.pruning.density}")
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
    from fedmef_core.algorithms import build_algorithm
    from fedmef_core.models import build_model

    ckpt = load_checkpoint(Path(config.runtime.checkpoints_dir) / FINAL_NAME)
    train, _ = load_dataset(config.data)
    model = build_model(config.model, train.images.shape[1], train.num_classes, train.images.shape[-1])
    model.load_state_dict(ckpt["model"])
    build_algorithm(config).bind_state(model, ckpt["server_state"])
    return model, ckpt
