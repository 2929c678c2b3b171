"""Client updates as Prefect tasks: one task per wave of clients, each client retried, then dropped.

`client_updates(config)` opens the round's exchange folder and the task runner (local or Ray) and yields
an executor, ``updates(broadcast, clients) -> RoundResults``, that the train flow calls once a round. Two
ways to hand the updates to the server's aggregation, which folds them one at a time in client-id order:

- one worker in the flow's own thread (`runtime.runner: local`, `runtime.workers: 1`, the default): the
  wave is a generator task that yields each client's update as it is trained, straight into the
  aggregation — nothing is written to disk and only one update is alive at a time;
- several workers (threads or Ray): each wave writes its updates to the exchange folder and only paths
  cross the task boundary; the aggregation then reads them one at a time, deleting each once read.
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
from prefect.utilities.annotations import quote

from fedmef_core.algorithms import ClientResult
from fedmef_core.budget import OverBudgetError
from fedmef_core.checkpoint import load_exchange, save_exchange
from fedmef_core.client import Broadcast, NonFiniteLossError, run_client
from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset, load_partition
from fedmef_core.device import resolve_device
from fedmef_core.errors import UserError
from fedmef_core.executors import ClientExecutor, RoundResults
from fedmef_core.registry import METHODS
from fedmef_core.runs import RunPaths
from tasks.runners import Submit, mark_crashed, runs_in_this_thread, task_runner


@lru_cache(maxsize=4)
def _partition(directory: str, mtime_ns: int):
    return load_partition(directory)


def cached_partition(directory: str):
    """Load the partition once per process (per version of the file)."""
    path = Path(directory) / "clients.json"
    return _partition(directory, path.stat().st_mtime_ns if path.exists() else 0)


def update_path(out_dir: str | Path, rnd: int, client_id: int) -> Path:
    return Path(out_dir) / f"update_r{rnd:04d}_c{client_id:04d}.pt"


def train_client(config: ExperimentConfig, broadcast: Broadcast, client_id: int) -> ClientResult:
    """Train one client from the broadcast. Workers load their own shard from the partition files."""
    train, _ = load_dataset(config.data)
    indices = cached_partition(config.runtime.partitions_dir)[client_id]
    result = run_client(config, broadcast, client_id, train, indices, resolve_device(config.runtime.device))
    print(f"round {broadcast.round}: client {client_id} trained on {result.num_samples} samples, "
          f"loss {result.train_loss:.4f}", flush=True)
    return result


class Trained:
    """One client of a wave: its update, or why it was dropped (`failure`, "Error: message"; `over_budget`: its
    step went over its device's memory budget).

    The update is taken out with :meth:`take`, which leaves the box empty: whatever still holds the box
    (Prefect's generator engine keeps the last value yielded while the next client trains) no longer
    holds the update, so only one is alive at a time.
    """

    def __init__(self, client: int, result: ClientResult | None = None, failure: str | None = None,
                 over_budget: bool = False):
        self.client, self._result, self.failure, self.over_budget = client, result, failure, over_budget

    def take(self) -> ClientResult:
        result, self._result = self._result, None
        if result is None:
            raise ValueError(f"client {self.client}: no update to take ({self.failure or 'already taken'})")
        return result


def train_clients(config: ExperimentConfig, broadcast: Broadcast, clients: list[int]) -> Iterator[Trained]:
    """Train `clients` in turn, one :class:`Trained` each: its update, or the failure of a client that failed
    `runtime.client_retries` + 1 times (dropped; the others go on). A NaN/inf loss is not retried: it stops
    the run; a step over the client's memory budget is not retried either (the same step would hold the same)."""
    for c in clients:
        try:
            result = _retried(config, broadcast, c)
        except NonFiniteLossError:
            raise
        except Exception as exc:  # noqa: BLE001 - any client fault (CUDA OOM included) drops the client
            yield Trained(c, failure=f"{type(exc).__name__}: {exc}", over_budget=isinstance(exc, OverBudgetError))
            continue
        trained = Trained(c, result)
        del result  # the box holds the only reference
        yield trained


# log_prints=False: each client's line goes to the console only; Prefect gets one line per wave (from the
# flow), so the API traffic of a round does not grow with its clients.
@task(name="client-wave", cache_policy=NO_CACHE, task_run_name="round-{rnd}-clients-{first}-{last}",
      log_prints=False)
def client_wave(config: ExperimentConfig, broadcast_path: str, rnd: int, first: int, last: int,
                clients: list[int], out_dir: str) -> dict:
    """Train a wave of clients in turn (one task, one broadcast read), writing each update to `out_dir`
    (see :func:`train_clients` for retries and drops).

    Returns ``{"updates": {client: {"path", "num_samples", "loss"}}, "failures": {client: "Error: message"},
    "over_budget": [client, ...]}``.
    """
    METHODS[config.pruning.method].load()  # a fresh worker (Ray) knows the method's records only once it imported it
    broadcast = Broadcast.from_dict(load_exchange(broadcast_path))
    updates, failures, over_budget = {}, {}, []
    for trained in train_clients(config, broadcast, clients):
        if trained.failure is not None:
            failures[trained.client] = trained.failure
            if trained.over_budget:
                over_budget.append(trained.client)
            continue
        result = trained.take()
        path = save_exchange(update_path(out_dir, rnd, result.client_id), result.to_dict())
        updates[result.client_id] = {"path": str(path), "num_samples": result.num_samples,
                                     "loss": result.train_loss}
    return {"updates": updates, "failures": failures, "over_budget": over_budget}


@task(name="client-wave", cache_policy=NO_CACHE, task_run_name="round-{rnd}-clients-{first}-{last}",
      log_prints=False)
def client_wave_in_memory(config: ExperimentConfig, broadcast: Broadcast, rnd: int, first: int, last: int,
                          clients: list[int]) -> Iterator[Trained]:
    """Train a wave of clients in turn in this process, yielding each update (or its drop) as it is
    trained (see :func:`train_clients`); the task run ends when the last client has been handed over."""
    yield from train_clients(config, broadcast, clients)


def _retried(config: ExperimentConfig, broadcast: Broadcast, client_id: int) -> ClientResult:
    """:func:`train_client`, retried `runtime.client_retries` times on any fault but a NaN/inf loss (a retry
    would fail the same way)."""
    retries = config.runtime.client_retries
    for attempt in range(retries + 1):
        try:
            return train_client(config, broadcast, client_id)
        except (NonFiniteLossError, OverBudgetError):
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


class ClientUpdates(ClientExecutor):
    """``updates(broadcast, clients)``: the round's client updates, as at most `runtime.workers` Prefect tasks
    (waves of clients), so the orchestration cost per round does not grow with the clients per round.

    A failing client is retried `runtime.client_retries` times inside its wave, then dropped (the round's
    :class:`RoundResults` count them, and so its metrics: ``dropped_clients``); a wave lost as a whole (its
    worker or node died) is submitted again as often, then drops its clients. The round goes on with the
    clients that succeeded unless fewer than `federation.min_clients` did. The updates reach the aggregation
    one at a time (a :class:`RoundResults`): in memory from a wave trained in this thread (`in_memory`), else
    from the exchange folder, each file deleted once read. With `in_memory` the clients
    train while the aggregation iterates, so drops are counted (and too few successes raised) when it has
    read the last one.
    """

    drops_clients = True  # retried, then dropped: the round's metrics count them

    def __init__(self, config: ExperimentConfig, exchange_dir: Path, submit: Submit, in_memory: bool = False):
        self.config, self.exchange_dir, self.submit, self.in_memory = config, exchange_dir, submit, in_memory

    def __call__(self, broadcast: Broadcast, clients: list[int]) -> RoundResults:
        if self.in_memory:
            return RoundResults.recording(lambda out: self._trained_here(broadcast, sorted(clients), out))
        rnd = broadcast.round
        bpath = save_exchange(self.exchange_dir / f"broadcast_r{rnd:04d}.pt", broadcast.to_dict())
        batches = waves(sorted(clients), self.config.runtime.workers)
        futures = [self.submit(client_wave, self._parameters(bpath, rnd, wave)) for wave in batches]
        updates, failures, over_budget = {}, {}, []
        try:
            for wave, future in zip(batches, futures):
                answer = self._answer(bpath, rnd, wave, future)
                updates.update(answer["updates"])
                failures.update(answer["failures"])
                over_budget += answer.get("over_budget", [])
                print(wave_summary(rnd, wave, answer), flush=True)
        finally:
            _remove(bpath)
        self._close_round(rnd, len(updates), len(clients), failures)
        results = RoundResults.fetched(updates, lambda c: _read_once(Path(updates[c]["path"])))
        results.dropped, results.over_budget = len(failures), over_budget
        return results

    def _answer(self, broadcast_path: Path, rnd: int, wave: list[int], future) -> dict:
        """A wave's answer. A wave lost as a whole (its Ray worker or node died) is a failed attempt of each of
        its clients: it is submitted again, up to `runtime.client_retries` times (Ray schedules it where it
        can, e.g. on a node still alive), then its clients are dropped."""
        retries = self.config.runtime.client_retries
        for attempt in range(retries + 1):
            try:
                return future.result()
            except NonFiniteLossError:
                raise
            except Exception as exc:  # noqa: BLE001 - a wave lost as a whole (e.g. its worker died)
                why = f"{type(exc).__name__}: {_brief(exc)}"
                mark_crashed(future, why)
                if attempt == retries:
                    return {"updates": {}, "failures": {c: why for c in wave}}
                _warn(f"round {rnd}: clients {wave[0]}-{wave[-1]} lost ({why}); retry {attempt + 1} of {retries}")
                future = self.submit(client_wave, self._parameters(broadcast_path, rnd, wave))
        raise AssertionError("unreachable")

    def _trained_here(self, broadcast: Broadcast, clients: list[int], out: RoundResults) -> Iterator[ClientResult]:
        """One wave, trained in this thread as the aggregation asks for each update (drops recorded on `out`)."""
        rnd = broadcast.round
        done, failures = {}, {}
        # quote: Prefect need not walk the config and the weights looking for futures (the task gets them as is)
        wave = client_wave_in_memory(quote(self.config), quote(broadcast), rnd, clients[0], clients[-1], clients)
        for trained in wave:
            if trained.failure is not None:
                failures[trained.client] = trained.failure
                out.dropped += 1
                if trained.over_budget:
                    out.over_budget.append(trained.client)
                continue
            result = trained.take()
            done[result.client_id] = {"num_samples": result.num_samples, "loss": result.train_loss}
            yield result
            del result  # the aggregation holds the only reference
        print(wave_summary(rnd, clients, {"updates": done, "failures": failures}), flush=True)
        self._close_round(rnd, len(done), len(clients), failures)

    def _parameters(self, broadcast_path: Path, rnd: int, wave: list[int]) -> dict:
        return {"config": self.config, "broadcast_path": str(broadcast_path), "rnd": rnd, "first": wave[0],
                "last": wave[-1], "clients": wave, "out_dir": str(self.exchange_dir)}

    def _close_round(self, rnd: int, succeeded: int, asked: int, failures: dict[int, str]) -> None:
        """Show the round's drops; too few successes fail the round."""
        lines = [f"client {c}: {why}" for c, why in failures.items()]
        for line in lines:
            print(f"round {rnd}: dropped {line}", flush=True)
        need = self.config.federation.min_clients
        if succeeded < need:
            raise RoundFailedError(
                f"round {rnd}: only {succeeded} of {asked} client updates succeeded (federation.min_clients is "
                f"{need}); the last good checkpoint is kept. Failures: " + "; ".join(lines)
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


def _brief(exc: BaseException) -> str:
    """An exception's message, its first line, cut after the first sentence if long (Ray's run on for
    paragraphs: what died, then advice)."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line.split(". ", 1)[0] + "." if len(line) > 160 and ". " in line else line


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
        yield ClientUpdates(config, exchange, submit, in_memory=runs_in_this_thread(config))
