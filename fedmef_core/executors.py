"""Who runs a round's clients, and how their results reach the server's aggregation.

An executor, ``executor(broadcast, clients)``, runs the round's clients (here in this process; Prefect tasks or
Ray workers in the pipeline, :mod:`tasks.clients`) and returns their results — a :class:`RoundResults` to stream
them, or a list. A :class:`RoundResults` hands the results over one at a time, in client-id order, as they are
read from disk or trained; the method's :class:`~fedmef_core.algorithms.base.Aggregator` folds each into running
sums and drops it, so the server never holds more than one client's update (the in-process executor of
:func:`fedmef_core.engine.run_rounds` trains each client only when the aggregation asks for its result). Nothing
is needed up front: a client that never answers simply never arrives.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar

from fedmef_core.algorithms import ClientResult
from fedmef_core.budget import OverBudgetError
from fedmef_core.client import Broadcast, run_client

if TYPE_CHECKING:
    from fedmef_core.engine import Server


class RoundResults:
    """A round's client results, handed over one at a time in client-id order by iterating.

    `results` yields them lazily (reads each from disk, or trains it, when asked); iterate once.
    ``fetch_seconds`` adds up the time spent producing them; what happened is recorded as they pass: the clients
    that ``arrived``, the ``memory`` each client with a budget held, the clients that went ``over_budget``
    (their executor adds them) and how many were ``dropped`` for any fault.
    """

    def __init__(self, results: Iterable[ClientResult]):
        self._results = iter(results)
        self.fetch_seconds = 0.0
        self.arrived: list[int] = []
        self.memory: dict[int, dict[str, float]] = {}
        self.over_budget: list[int] = []
        self.dropped = 0

    @classmethod
    def of(cls, results: Iterable[ClientResult]) -> RoundResults:
        """Results already in memory (in any order)."""
        return cls(sorted(results, key=lambda r: r.client_id))

    @classmethod
    def fetched(cls, clients: Iterable[int], fetch: Callable[[int], ClientResult]) -> RoundResults:
        """``fetch(client_id)`` for each of `clients`, in client-id order, when the aggregation reaches it; a
        client whose step goes over its memory budget is left out (counted in ``over_budget``)."""

        def produce(out: RoundResults) -> Iterator[ClientResult]:
            for c in sorted(clients):
                try:
                    result = fetch(c)
                except OverBudgetError:
                    out.over_budget.append(c)
                    out.dropped += 1
                    continue
                yield result
                del result

        return cls.recording(produce)

    @classmethod
    def recording(cls, produce: Callable[[RoundResults], Iterable[ClientResult]]) -> RoundResults:
        """Results from ``produce(results)``, which may record on ``results`` (drops, over-budget clients) as it
        goes."""
        out = cls(())
        out._results = iter(produce(out))
        return out

    def __iter__(self) -> Iterator[ClientResult]:
        while True:
            start = time.perf_counter()
            try:
                result = next(self._results)
            except StopIteration:
                return
            finally:
                self.fetch_seconds += time.perf_counter() - start
            self.arrived.append(result.client_id)
            if result.memory:
                self.memory[result.client_id] = result.memory
            yield result
            del result  # no reference kept here: one result alive at a time


class ClientExecutor(ABC):
    """Runs a round's clients: ``executor(broadcast, clients)`` gives their results (a :class:`RoundResults` to
    stream them, or a list).

    ``drops_clients`` says whether it may drop a client and go on: one that retries failing clients and then
    drops them (the pipeline's, :class:`tasks.clients.ClientUpdates`) sets it, and its rounds' metrics then count
    them (``dropped_clients``, 0 included). The in-process executor here leaves it false: a failing client fails
    the run, so there is nothing to count."""

    drops_clients: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, broadcast: Broadcast, clients: list[int]) -> RoundResults | list[ClientResult]: ...


class InProcess(ClientExecutor):
    """Run the round's clients one after another in this process. `streamed`: each when the aggregation reads
    its result (a :class:`RoundResults`: only one client update alive at a time); else all of them, as a list."""

    def __init__(self, server: Server, streamed: bool = True):
        self.server, self.streamed = server, streamed

    def __call__(self, broadcast: Broadcast, clients: list[int]) -> RoundResults | list[ClientResult]:
        server = self.server

        def train(c: int) -> ClientResult:
            return run_client(server.config, broadcast, c, server.train, server.parts[c], server.device)

        results = RoundResults.fetched(clients, train)
        return results if self.streamed else list(results)


def streaming_executor(server: Server) -> InProcess:
    """Run the round's clients in this process, each when the aggregation reads its result."""
    return InProcess(server)


def local_executor(server: Server) -> InProcess:
    """Run the round's clients one after another in this process and return all their results (a list)."""
    return InProcess(server, streamed=False)
