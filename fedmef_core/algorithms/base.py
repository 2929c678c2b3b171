"""The interface every federated method implements: a server-side strategy and a client-side round.

The shared loops call it: `fedmef_core.engine` on the server (broadcast, stream the client results into an
:class:`Aggregator`, finish the round), `fedmef_core.client.local_train` on a client (one
:class:`ClientRound`, created per client and round, whose hooks the local training loop calls). A method
overrides only what it changes; what it keeps, sends and sums are typed records (:mod:`.records`, and its
own in its module). The base class *is* dense FedAvg: no mask, plain cross-entropy, sample-weighted
averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fedmef_core.aggregation import WeightedSum
from fedmef_core.algorithms.records import ClientResult, RoundPayload, ServerState
from fedmef_core.config import ExperimentConfig
from fedmef_core.registry import MethodTraits as MethodTraits  # its traits live in its registry entry
from fedmef_core.sparse.comm import state_bytes
from fedmef_core.wire import Record

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
BatchSource = Callable[[], Batches]  # a fresh pass over the client's data at every call


class ClientRound:
    """One client's local training in one round: the hooks the loop calls and the state they share.

    Created (by :meth:`FederatedAlgorithm.client_round`) once the client loaded the global weights, and dropped
    with the round: nothing a client computes stays on the algorithm. The base trains plainly.
    """

    def __init__(self, config: ExperimentConfig, model: nn.Module, payload: RoundPayload):
        self.config, self.model, self.payload = config, model, payload

    def lr(self, base_lr: float, step: int, total_steps: int) -> float:
        """The learning rate of local step `step` of `total_steps` (e.g. BaE's budget-aware lr)."""
        return base_lr

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the task loss at every local step (e.g. BaE's extrusion loss)."""
        return None

    def before_step(self) -> None:
        """Called after backward, before every optimizer step (e.g. mask the gradients)."""

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. re-zero masked weights)."""

    def step_end(self, steps_done: int, total_steps: int, batches: BatchSource) -> None:
        """Called after every local step (after :meth:`after_step`) with the steps done so far out of
        `total_steps`; ``batches()`` is a fresh pass over the client's data (e.g. FedDST's mid-training
        prune-and-grow)."""

    def upload(self, batches: Batches) -> Record | None:
        """What the client sends back besides its weights (e.g. top-k gradients of inactive weights)."""
        return None


class Aggregator:
    """One round's aggregation, fed one client result at a time (the engine feeds them in client-id order).

    The loop is shared; methods vary it through three hooks of their algorithm: ``round_sums`` (the running
    sums a round needs beyond the weighted average, e.g. summed gradient scores: a record of the method's),
    ``fold`` (add one client's result to them, weighted by its sample count) and ``finish_aggregate`` (turn
    the averaged state and the sums into the new global model and server state). Nothing about the results
    to come is needed up front: ``clients`` and ``samples`` count those added so far.
    """

    def __init__(self, algorithm: FederatedAlgorithm, rnd: int, model: nn.Module, state: ServerState):
        self.algorithm, self.rnd = algorithm, rnd
        self.average = WeightedSum()
        self.sums = algorithm.round_sums(rnd, model, state)
        self.clients = 0

    @property
    def samples(self) -> int:
        return int(self.average.total)

    def add(self, result: ClientResult) -> None:
        self.average.add(result.state, result.num_samples)
        self.algorithm.fold(self.sums, result)
        self.clients += 1

    def finish(self, model: nn.Module, state: ServerState,
               before_adjust: Callable[[], None] | None = None) -> dict[str, float]:
        """Fold the sums into the global `model` and `state` (in place); return metrics to log.

        A method that prunes the averaged model on the server calls ``before_adjust()`` between the
        averaging and its prune-and-grow (the engine measures the prune drop there); others never do.
        """
        return self.algorithm.finish_aggregate(self.rnd, model, self.average.result(), self.clients, self.sums,
                                               state, before_adjust)


class FederatedAlgorithm:
    """Dense FedAvg, and the hook points that pruning methods override."""

    name = "fedavg"
    state_type: type[ServerState] = ServerState  # what init_server_state returns and a checkpoint restores
    client_round_type: type[ClientRound] = ClientRound  # what client_round returns

    def __init__(self, config: ExperimentConfig):
        self.config = config

    # ---- server side -------------------------------------------------------------------------
    def init_server_state(self, model: nn.Module, generator: torch.Generator) -> ServerState:
        """State the server keeps between rounds (e.g. masks); saved in every checkpoint."""
        return self.state_type()

    def bind_state(self, model: nn.Module, state: ServerState) -> None:
        """Attach server state the model needs to compute (e.g. masks of NSConv layers); called after
        init, restore and aggregation, and on a model loaded for evaluation."""

    def round_payload(self, rnd: int, model: nn.Module, state: ServerState) -> RoundPayload:
        """What round `rnd`'s clients receive besides the global weights."""
        return RoundPayload()

    def round_sums(self, rnd: int, model: nn.Module, state: ServerState) -> Any:
        """The running sums round `rnd` folds every client result into, besides the weighted average (a
        record of the method's; None: none)."""
        return None

    def fold(self, sums: Any, result: ClientResult) -> None:
        """Add one client's result to the round's `sums` (see :meth:`round_sums`)."""

    def finish_aggregate(self, rnd: int, model: nn.Module, averaged: dict[str, torch.Tensor], clients: int,
                         sums: Any, state: ServerState,
                         before_adjust: Callable[[], None] | None = None) -> dict[str, float]:
        """Make the sample-weighted average of the `clients` states (`averaged`) and the round's `sums` the
        new global `model` and `state`; return metrics to log (see :meth:`Aggregator.finish`)."""
        model.load_state_dict(averaged)
        dense = float(clients * state_bytes(averaged))  # every client sends and receives the dense model
        return {"comm/upload_bytes": dense, "comm/download_bytes": dense}

    def setup_payload(self, model: nn.Module, state: ServerState) -> Record | None:
        """Data for a one-off exchange with clients before round 1 (e.g. FedTiny's candidate masks);
        None = no setup exchange. Called while no round has run."""
        return None

    def finish_setup(self, model: nn.Module, results: list[ClientResult], state: ServerState) -> dict[str, float]:
        """Fold the clients' setup answers into the global `model` and `state`; return metrics to log."""
        return {}

    # ---- client side -------------------------------------------------------------------------
    def client_setup(self, model: nn.Module, payload: Record, batches: BatchSource) -> Record | None:
        """A client's answer to :meth:`setup_payload` (it trains nothing)."""
        return None

    def client_round(self, model: nn.Module, payload: RoundPayload) -> ClientRound:
        """A client's round of local training on `model`, which holds the global weights."""
        return self.client_round_type(self.config, model, payload)
