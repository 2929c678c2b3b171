"""The server side of federated training and the one round loop every run uses.

`run_rounds` is the whole story, for the pipeline's train flow, the bare loop of the tests and benchmarks
alike: the method's setup exchange, then per round (:func:`run_round`) sample clients, broadcast, let an
executor run the client updates (in-process here; Prefect tasks or Ray workers in the pipeline), aggregate,
evaluate; after each round its :class:`~fedmef_core.rounds.RoundOutcome` goes to the observers (checkpoints on
the one schedule of :class:`~fedmef_core.rounds.Checkpoints`; the pipeline's reports and outputs). Methods vary
it only through the hooks of `FederatedAlgorithm`; callers vary it only through the executor, the observers and
where a stop may land (`stops`).

Aggregation streams: an executor may return a :class:`~fedmef_core.executors.RoundResults`, which hands over
the round's client results one at a time (:mod:`fedmef_core.executors`: the executors and their results).

On adjustment rounds of methods that prune the averaged model on the server (FedTiny, FedMef, PruneFL)
the engine also tests the averaged model right before the prune-and-grow and reports
``prune_drop`` = its test accuracy minus the accuracy right after (one extra evaluation; none on
other rounds or methods).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedmef_core.algorithms import ClientResult
from fedmef_core.algorithms.base import Aggregator
from fedmef_core.client import Broadcast
from fedmef_core.config import ExperimentConfig
from fedmef_core.cpu import use_threads
from fedmef_core.data import ImageData
from fedmef_core.devices import Fleet, RoundPlan, assign_devices
from fedmef_core.evaluation import EvalResult, evaluate
from fedmef_core.executors import ClientExecutor, RoundResults, streaming_executor
from fedmef_core.initial import initial_model
from fedmef_core.models import GLOBAL_RNG
from fedmef_core.planner import profile_config
from fedmef_core.rounds import Checkpoints, OnRound, RoundObserver, RoundOutcome

RoundCallback = Callable[[int, dict[str, float]], None]


# a round's wall-clock metrics: reported (MLflow, progress) but left out of checkpoints, so identical runs write
# identical checkpoint files (a DVC output: hashed in dvc.lock)
TIMING_KEYS = ("round_seconds",)


class Server:
    """The global model, the method's server state and the round history."""

    def __init__(
        self,
        config: ExperimentConfig,
        train: ImageData,
        test: ImageData,
        parts: Sequence[np.ndarray],
        device: torch.device,
    ):
        fed = config.federation
        if len(parts) != fed.num_clients:
            raise ValueError(
                f"the partition has {len(parts)} clients but federation.num_clients is {fed.num_clients}; "
                "re-run the partition stage (`dvc repro partition`)"
            )
        self.config, self.train, self.test, self.parts, self.device = config, train, test, parts, device
        use_threads(config.runtime.threads)
        self.model, self.algorithm, self.state = initial_model(config, train.shape)
        self.fleet = _fleet(config, train, parts)  # None: unlimited devices
        self.device_rows: list[dict] = []  # the last round's per-client device rows (with budgets)
        self.round = 0  # rounds completed
        self.history: list[dict[str, float]] = []
        self.last_eval: EvalResult | None = None

    # ---- one round ---------------------------------------------------------------------------
    def pending_rounds(self) -> range:
        """The rounds still to run (all of them, or those after a restored checkpoint)."""
        return range(self.round + 1, self.config.federation.rounds + 1)

    def sample_clients(self, rnd: int) -> list[int]:
        fed = self.config.federation
        rng = np.random.default_rng([fed.seed, rnd])
        return sorted(int(c) for c in rng.choice(fed.num_clients, fed.clients_per_round, replace=False))

    def plan_round(self, rnd: int) -> RoundPlan:
        """The round's sampled clients: with budgets, how each trains or that it is excluded."""
        sampled = self.sample_clients(rnd)
        return RoundPlan.unlimited(sampled) if self.fleet is None else self.fleet.plan(sampled)

    def lr_for_round(self, rnd: int) -> float:
        """Exponential decay from `lr` in round 1 to `lr_final` in the last round."""
        fed = self.config.federation
        frac = (rnd - 1) / max(fed.rounds - 1, 1)
        return fed.lr * (fed.lr_final / fed.lr) ** frac

    def broadcast(self, rnd: int, plan: RoundPlan | None = None) -> Broadcast:
        payload = self.algorithm.round_payload(rnd, self.model, self.state)
        return Broadcast(round=rnd, lr=self.lr_for_round(rnd), state=self._weights_copy(), payload=payload,
                         plans=plan.wire() if plan is not None else {})

    def _weights_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def finish_round(self, rnd: int, results: RoundResults | Sequence[ClientResult], seconds: float,
                     plan: RoundPlan | None = None) -> dict[str, float]:
        """Aggregate the round's results (streamed in client-id order: the order never depends on timing),
        evaluate where scheduled and return the round's metrics. `seconds`: how long the clients took
        before this call (time spent fetching streamed results is added). `plan`: the round's
        :meth:`plan_round`; with device budgets its ``devices/`` metrics are added (``self.device_rows`` holds
        its per-client rows), and a round whose sampled clients were all excluded leaves the model as it was."""
        if not isinstance(results, RoundResults):
            results = RoundResults.of(results)
        aggregator = Aggregator(self.algorithm, rnd, self.model, self.state)
        losses, lr_steps, steps, samples = [], 0.0, 0, 0
        for r in results:
            aggregator.add(r)
            losses.append(r.train_loss * r.num_samples)
            lr_steps, steps = lr_steps + r.lr_mean * r.steps, steps + r.steps
            samples += r.num_samples * self.config.federation.local_epochs if r.steps else 0
            del r  # released before the next one is fetched
        nobody = plan is not None and self.fleet is not None and not aggregator.clients
        if not aggregator.clients and not nobody:
            raise ValueError(f"round {rnd}: no client result to aggregate")
        before: list[EvalResult] = []  # the averaged model's test result, where the method prunes it after
        method_metrics = {} if nobody else aggregator.finish(self.model, self.state,
                                                              before_adjust=lambda: before.append(self._evaluate()))
        self.algorithm.bind_state(self.model, self.state)
        metrics: dict[str, float] = {
            "round": rnd,
            "lr": self.lr_for_round(rnd),
            **({} if nobody else {"train_loss": sum(losses) / aggregator.samples}),
            **({"lr_local": lr_steps / steps} if steps else {}),  # the mean lr of the clients' local steps
            "local_steps": steps,  # what the round cost the clients: optimizer steps, samples seen
            "local_samples": samples,
            "clients": aggregator.clients,
            "round_seconds": seconds + results.fetch_seconds,
            **method_metrics,
        }
        if plan is not None and self.fleet is not None:
            self.device_rows = self.fleet.round_rows(rnd, plan, results.arrived, results.memory, results.over_budget)
            metrics.update(self.fleet.round_metrics(self.device_rows))
        run = self.config.runtime
        scheduled = rnd % run.eval_every == 0 or rnd == self.config.federation.rounds
        after = self._evaluate() if scheduled or before else None
        if scheduled:
            self.last_eval = after
            metrics["accuracy"] = after.accuracy
            metrics["loss"] = after.loss
        if before:  # what the server's prune-and-grow cost
            metrics["prune_drop"] = before[0].accuracy - after.accuracy
        self.round = rnd
        self.history.append(metrics)
        return metrics

    def _evaluate(self) -> EvalResult:
        return evaluate(self.model, self.test, self.device)

    def setup(self, executor: ClientExecutor) -> dict[str, float]:
        """The method's one-off exchange with clients before round 1, if it has one (else ``{}``)."""
        payload = self.algorithm.setup_payload(self.model, self.state)
        if self.round > 0 or payload is None:
            return {}
        results = executor(Broadcast(round=0, lr=0.0, state=self._weights_copy(), setup=payload),
                           self.sample_clients(0))
        metrics = self.algorithm.finish_setup(self.model, sorted(results, key=lambda r: r.client_id), self.state)
        self.algorithm.bind_state(self.model, self.state)
        return metrics

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": 1,
            "round": self.round,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "server_state": self.state.to_wire(),  # a plain dict: {"masks": ...} (none for dense FedAvg)
            "history": [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in self.history],
            "torch_rng": torch.get_rng_state(),
            "config": self.config.model_dump(mode="json"),
            "extra": extra or {},
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.state = self.algorithm.state_type.from_wire(ckpt["server_state"])
        self.history = list(ckpt["history"])
        self.round = int(ckpt["round"])
        with GLOBAL_RNG:
            torch.set_rng_state(ckpt["torch_rng"])
        self.algorithm.bind_state(self.model, self.state)


def _fleet(config: ExperimentConfig, train: ImageData, parts: Sequence[np.ndarray]) -> Fleet | None:
    """The clients' devices (None when unlimited): budgets drawn with the partition seed, fitted by the planner
    on a profile of the initial model traced on the training images."""
    labels = train.labels.numpy()
    assignment = assign_devices(config.devices, labels, parts, train.num_classes, config.partition.seed)
    if assignment is None:
        return None
    return Fleet(config, assignment, profile_config(config, train), labels, parts, train.num_classes)


class Stops(Protocol):
    """Where a stop (Ctrl-C, SIGTERM) may land: ``interruptible()`` wraps the part of a round that changes
    nothing on disk (training and aggregation); the flow's is :func:`flows.lifecycle.safe_points`."""

    def interruptible(self) -> AbstractContextManager[None]: ...


class _Anywhere:
    """The bare loop's stops: a signal lands wherever it lands (writes are atomic anyway)."""

    def interruptible(self) -> AbstractContextManager[None]:
        return nullcontext()


ANYWHERE = _Anywhere()


@contextmanager
def stops_anywhere() -> Iterator[Stops]:
    yield ANYWHERE


def run_round(server: Server, rnd: int, executor: ClientExecutor, stops: Stops = ANYWHERE) -> RoundOutcome:
    """One round: plan it (who trains, how), broadcast, run the clients, aggregate and evaluate — all of it
    interruptible (nothing is written) — and say what happened."""
    started = time.perf_counter()
    with stops.interruptible():
        plan = server.plan_round(rnd)  # who trains, at which batch and SAP gamma, who cannot
        results = executor(server.broadcast(rnd, plan), plan.trained) if plan.trained else []
        if not isinstance(results, RoundResults):
            results = RoundResults.of(results)
        metrics = server.finish_round(rnd, results, time.perf_counter() - started, plan)
    if executor.drops_clients:  # see ClientExecutor; the last key of the round's row
        metrics["dropped_clients"] = results.dropped
    return RoundOutcome(rnd, metrics, plan.trained, list(results.arrived), results.dropped, list(results.over_budget))


def run_rounds(
    server: Server,
    executor: ClientExecutor | None = None,
    *,
    observers: Sequence[RoundObserver] = (),
    stops: Callable[[], AbstractContextManager[Stops]] = stops_anywhere,
    checkpoint_dir: str | Path | None = None,
    on_round: RoundCallback | None = None,
) -> list[dict[str, float]]:
    """The round loop: the method's setup exchange (if any, through the same executor), then the remaining
    rounds, each followed by the `observers` in order; then the end. Returns the history.

    `stops()` is entered for the rounds (not the setup): a signal then lands only inside a round's
    interruptible part, or waits for the observers' writes. The bare loop's conveniences: `checkpoint_dir`
    adds :class:`~fedmef_core.rounds.Checkpoints` there (round checkpoints on the schedule, and ``final.pt``),
    then `on_round(round, metrics)` after each round (``on_round(0, metrics)`` after a setup exchange).
    """
    executor = executor or streaming_executor(server)
    watching = list(observers)
    if checkpoint_dir is not None:
        watching.append(Checkpoints.of(server.config, checkpoint_dir))
    if on_round is not None:
        watching.append(OnRound(on_round))
    if setup := server.setup(executor):
        for observer in watching:
            observer.setup_done(server, setup)
    with stops() as stop:
        for rnd in server.pending_rounds():
            outcome = run_round(server, rnd, executor, stop)
            for observer in watching:
                observer.round_done(server, outcome)
    for observer in watching:
        observer.training_done(server)
    return server.history
