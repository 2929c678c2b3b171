"""Client updates as Prefect tasks: one task per client, retried, then dropped; only paths cross the boundary.

`client_updates(config)` opens the round's exchange folder and the task runner (local or Ray) and yields
an executor, ``updates(broadcast, clients) -> [ClientResult]``, that the train flow calls once a round.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedmef_core.algorithms import ClientResult
from fedmef_core.checkpoint import load_checkpoint, save_checkpoint
from fedmef_core.client import Broadcast, NonFiniteLossError, run_client
from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, load_partition
from fedmef_core.device import resolve_device
from fedmef_core.errors import UserError
from fedmef_core.runs import RunPaths
from tasks.runners import Submit, task_runner


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


class ClientUpdates:
    """``updates(broadcast, clients)``: the round's client updates as tasks, `runtime.workers` at a time.

    A failing update is retried `runtime.client_retries` times, then dropped (``dropped[round]`` counts
    them); the round goes on with the clients that succeeded unless fewer than `federation.min_clients` did.
    """

    def __init__(self, config: ExperimentConfig, exchange_dir: Path, submit: Submit):
        self.config, self.exchange_dir, self.submit = config, exchange_dir, submit
        self.dropped: dict[int, int] = {}
        self.task = client_update.with_options(
            retries=config.runtime.client_retries, retry_condition_fn=_retry_unless_nonfinite
        )

    def __call__(self, broadcast: Broadcast, clients: list[int]) -> list[ClientResult]:
        rnd = broadcast.round
        bpath = save_checkpoint(self.exchange_dir / f"broadcast_r{rnd:04d}.pt", broadcast.to_dict())
        paths, failures = [], []
        wave = self.config.runtime.workers
        for i in range(0, len(clients), wave):
            batch = clients[i : i + wave]
            futures = [self.submit(self.task, self._parameters(bpath, rnd, c)) for c in batch]
            for c, future in zip(batch, futures):
                try:
                    paths.append(future.result())
                except NonFiniteLossError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any client fault (CUDA OOM included) drops the client
                    failures.append(f"client {c}: {type(exc).__name__}: {exc}")
        self.dropped[rnd] = len(failures)
        for line in failures:
            print(f"round {rnd}: dropped {line}", flush=True)
        self._require_enough(rnd, len(paths), len(clients), failures)
        results = [ClientResult.from_dict(load_checkpoint(p)) for p in paths]
        for p in [bpath, *map(Path, paths)]:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".sha256").unlink(missing_ok=True)
        return results

    def _parameters(self, broadcast_path: Path, rnd: int, client_id: int) -> dict:
        return {"config": self.config, "broadcast_path": str(broadcast_path), "rnd": rnd, "client_id": client_id,
                "out_dir": str(self.exchange_dir)}

    def _require_enough(self, rnd: int, succeeded: int, asked: int, failures: list[str]) -> None:
        need = self.config.federation.min_clients
        if succeeded < need:
            raise RoundFailedError(
                f"round {rnd}: only {succeeded} of {asked} client updates succeeded (federation.min_clients is "
                f"{need}); the last good checkpoint is kept. Failures: " + "; ".join(failures)
            )


EXCHANGE_NAME = ".exchange"


@contextmanager
def exchange_folder(config: ExperimentConfig, paths: RunPaths) -> Iterator[Path]:
    """Where broadcasts and updates pass between the flow and its workers: `<run folder>/.exchange` (what a
    killed run left there is cleared first: the caller holds the folder's lock), or a fresh folder inside
    `runtime.exchange_dir` (storage every Ray node shares). Removed afterwards."""
    if config.runtime.exchange_dir:
        Path(config.runtime.exchange_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fedmef-exchange-", dir=config.runtime.exchange_dir) as tmp:
            yield Path(tmp)
        return
    folder = paths.root / EXCHANGE_NAME
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def client_updates(config: ExperimentConfig, paths: RunPaths) -> Iterator[ClientUpdates]:
    """The executor of client updates, with its exchange folder and task runner."""
    with exchange_folder(config, paths) as exchange, task_runner(config) as submit:
        yield ClientUpdates(config, exchange, submit)
