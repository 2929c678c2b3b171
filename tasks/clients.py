"""Client updates as Prefect tasks: one task per wave of clients, each client retried, then dropped; only
paths cross the boundary.

`client_updates(config)` opens the round's exchange folder and the task runner (local or Ray) and yields
an executor, ``updates(broadcast, clients) -> RoundResults``, that the train flow calls once a round; the
server's aggregation then reads the updates from disk one at a time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from fedmef_core.algorithms import ClientResult
from fedmef_core.checkpoint import load_exchange, save_exchange
from fedmef_core.client import Broadcast, NonFiniteLossError, run_client
from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, load_partition
from fedmef_core.device import resolve_device
from fedmef_core.engine import RoundResults
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


def update_path(out_dir: str | Path, rnd: int, client_id: int) -> Path:
    return Path(out_dir) / f"update_r{rnd:04d}_c{client_id:04d}.pt"


def client_update(config: ExperimentConfig, broadcast: Broadcast, client_id: int, out_dir: str) -> dict:
    """Train one client from the broadcast; write its update and return ``{"path", "num_samples", "loss"}``.

    Workers load their own shard from the partition files: only paths cross the task boundary.
    """
    train, _ = load_dataset(config.data)
    indices = cached_partition(config.runtime.partitions_dir)[client_id]
    result = run_client(config, broadcast, client_id, train, indices, resolve_device(config.runtime.device))
    path = save_exchange(update_path(out_dir, broadcast.round, client_id), result.to_dict())
    print(f"round {broadcast.round}: client {client_id} trained on {result.num_samples} samples, "
          f"loss {result.train_loss:.4f}", flush=True)
    return {"path": str(path), "num_samples": result.num_samples, "loss": result.train_loss}


# log_prints=False: each client's line goes to the console only; Prefect gets one line per wave (from the
# flow), so the API traffic of a round does not grow with its clients.
@task(name="client-wave", cache_policy=NO_CACHE, task_run_name="round-{rnd}-clients-{first}-{last}",
      log_prints=False)
def client_wave(config: ExperimentConfig, broadcast_path: str, rnd: int, first: int, last: int,
                clients: list[int], out_dir: str) -> dict:
    """Train a wave of clients in turn (one task, one broadcast read); a failing client is retried
    `runtime.client_retries` times, then dropped, while the others go on. A NaN/inf loss is not retried:
    it stops the run.

    Returns ``{"updates": {client: {"path", "num_samples", "loss"}}, "failures": {client: "Error: message"}}``.
    """
    broadcast = Broadcast.from_dict(load_exchange(broadcast_path))
    updates, failures = {}, {}
    for c in clients:
        try:
            updates[c] = _retried(config, broadcast, c, out_dir)
        except NonFiniteLossError:
            raise
        except Exception as exc:  # noqa: BLE001 - any client fault (CUDA OOM included) drops the client
            failures[c] = f"{type(exc).__name__}: {exc}"
    return {"updates": updates, "failures": failures}


def _retried(config: ExperimentConfig, broadcast: Broadcast, client_id: int, out_dir: str) -> dict:
    """:func:`client_update`, retried `runtime.client_retries` times on any fault but a NaN/inf loss (a retry
    would fail the same way)."""
    retries = config.runtime.client_retries
    for attempt in range(retries + 1):
        try:
            return client_update(config, broadcast, client_id, out_dir)
        except NonFiniteLossError:
            raise
        except Exception as exc:  # noqa: BLE001 - the last attempt's fault drops the client
            if attempt == retries:
                raise
            _warn(f"round {broadcast.round}: client {client_id} failed ({type(exc).__name__}: {exc}); "
                  f"retry {attempt + 1} of {retries}")
    raise AssertionError("unreachable")


def _warn(message: str) -> None:
    """A retry is worth seeing in the Prefect UI too (the task's prints stay on the console)."""
    try:
        get_run_logger().warning(message)
    except MissingContextError:  # called outside a task run (tests, the bare loop)
        print(message, flush=True)


class RoundFailedError(UserError):
    """Too few client updates of a round succeeded; the last good checkpoint is kept."""


def waves(clients: list[int], count: int) -> list[list[int]]:
    """`clients` (sorted) cut into at most `count` contiguous waves of near-equal size."""
    size = -(-len(clients) // max(count, 1))
    return [clients[i : i + size] for i in range(0, len(clients), size)]


class ClientUpdates:
    """``updates(broadcast, clients)``: the round's client updates, as `runtime.workers` Prefect tasks
    (waves of clients), so the orchestration cost per round does not grow with the clients per round.

    A failing client is retried `runtime.client_retries` times inside its wave, then dropped
    (``dropped[round]`` counts them); a wave that fails as a whole drops its clients. The round goes on with
    the clients that succeeded unless fewer than `federation.min_clients` did. The updates stay on disk
    until the aggregation reads them, one at a time (a :class:`RoundResults`); each file is deleted once read.
    """

    def __init__(self, config: ExperimentConfig, exchange_dir: Path, submit: Submit):
        self.config, self.exchange_dir, self.submit = config, exchange_dir, submit
        self.dropped: dict[int, int] = {}

    def __call__(self, broadcast: Broadcast, clients: list[int]) -> RoundResults:
        rnd = broadcast.round
        bpath = save_exchange(self.exchange_dir / f"broadcast_r{rnd:04d}.pt", broadcast.to_dict())
        batches = waves(sorted(clients), self.config.runtime.workers)
        futures = [self.submit(client_wave, self._parameters(bpath, rnd, wave)) for wave in batches]
        updates, failures = {}, []
        try:
            for wave, future in zip(batches, futures):
                try:
                    answer = future.result()
                except NonFiniteLossError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a wave lost as a whole (e.g. its worker died)
                    answer = {"updates": {}, "failures": {c: f"{type(exc).__name__}: {exc}" for c in wave}}
                updates.update(answer["updates"])
                failures += [f"client {c}: {why}" for c, why in answer["failures"].items()]
                print(wave_summary(rnd, wave, answer), flush=True)
        finally:
            _remove(bpath)
        self.dropped[rnd] = len(failures)
        for line in failures:
            print(f"round {rnd}: dropped {line}", flush=True)
        self._require_enough(rnd, len(updates), len(clients), failures)
        return RoundResults({c: u["num_samples"] for c, u in updates.items()},
                            lambda c: _read_once(Path(updates[c]["path"])))

    def _parameters(self, broadcast_path: Path, rnd: int, wave: list[int]) -> dict:
        return {"config": self.config, "broadcast_path": str(broadcast_path), "rnd": rnd, "first": wave[0],
                "last": wave[-1], "clients": wave, "out_dir": str(self.exchange_dir)}

    def _require_enough(self, rnd: int, succeeded: int, asked: int, failures: list[str]) -> None:
        need = self.config.federation.min_clients
        if succeeded < need:
            raise RoundFailedError(
                f"round {rnd}: only {succeeded} of {asked} client updates succeeded (federation.min_clients is "
                f"{need}); the last good checkpoint is kept. Failures: " + "; ".join(failures)
            )


def wave_summary(rnd: int, wave: list[int], answer: dict) -> str:
    """One line for a wave: how many of its clients trained, on how many samples, their losses, drops."""
    done = answer["updates"]
    line = f"round {rnd}: clients {wave[0]}-{wave[-1]}: {len(done)} of {len(wave)} trained"
    if done:
        losses = {c: u["loss"] for c, u in done.items()}
        worst = max(losses, key=losses.get)
        line += (f" on {sum(u['num_samples'] for u in done.values())} samples, loss mean "
                 f"{sum(losses.values()) / len(losses):.4f} (highest {losses[worst]:.4f}, client {worst})")
    return line + (f", {len(answer['failures'])} dropped" if answer["failures"] else "")


def _read_once(path: Path) -> ClientResult:
    """A client update from the exchange folder, which is then deleted."""
    result = ClientResult.from_dict(load_exchange(path))
    _remove(path)
    return result


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


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
