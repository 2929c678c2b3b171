"""The hooks every federated method plugs into.

The shared loop (`fedmef_core.client.local_train` on the clients, `fedmef_core.engine` on the
server) calls these hooks; a method overrides only what it changes. The base class *is* dense
FedAvg: no mask, plain cross-entropy, sample-weighted averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedmef_core.aggregation import WeightedSum
from fedmef_core.config import ExperimentConfig
from fedmef_core.registry import MethodTraits as MethodTraits  # its traits live in its registry entry
from fedmef_core.sparse.comm import state_bytes

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
BatchSource = Callable[[], Batches]  # a fresh pass over the client's data at every call


@dataclass
class ClientResult:
    """What a client sends back after local training (tensors on CPU)."""

    client_id: int
    num_samples: int
    state: dict[str, torch.Tensor]
    train_loss: float
    steps: int
    upload: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)  # what a client with a budget held (budget.MemoryGuard)

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "num_samples": self.num_samples,
            "state": self.state,
            "train_loss": self.train_loss,
            "steps": self.steps,
            "upload": self.upload,
            "memory": self.memory,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientResult:
        return cls(**d)


class Aggregator:
    """One round's aggregation, fed one client result at a time (the engine feeds them in client-id order).

    The loop is shared; methods vary it through three hooks of their algorithm: ``round_sums`` (the running
    sums a round needs beyond the weighted average, e.g. summed gradient scores), ``fold`` (add one
    client's result to them, weighted by its sample count) and ``finish_aggregate`` (turn the averaged
    state and the sums into the new global model and server state). Nothing about the results to come is
    needed up front: ``clients`` and ``samples`` count those added so far.
    """

    def __init__(self, algorithm: FederatedAlgorithm, rnd: int, model: nn.Module, state: dict[str, Any]):
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

    def finish(self, model: nn.Module, state: dict[str, Any],
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

    def __init__(self, config: ExperimentConfig):
        self.config = config

    # ---- server side -------------------------------------------------------------------------
    def init_server_state(self, model: nn.Module, generator: torch.Generator) -> dict[str, Any]:
        """State the server keeps between rounds (e.g. masks); saved in every checkpoint."""
        return {}

    def bind_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Attach server state the model needs to compute (e.g. masks of NSConv layers); called after
        init, restore and aggregation, and on a model loaded for evaluation."""

    def round_payload(self, rnd: int, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """Extra data broadcast to the round's clients with the global weights."""
        return {}

    def aggregator(self, rnd: int, model: nn.Module, state: dict[str, Any]) -> Aggregator:
        """A fresh :class:`Aggregator` for round `rnd`."""
        return Aggregator(self, rnd, model, state)

    def aggregate(
        self, rnd: int, model: nn.Module, results: list[ClientResult], state: dict[str, Any],
        before_adjust: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """Fold a list of client results into the global `model` (in place), in client-id order; return
        metrics to log. The engine streams them through :meth:`aggregator` instead."""
        results = sorted(results, key=lambda r: r.client_id)
        aggregator = self.aggregator(rnd, model, state)
        for r in results:
            aggregator.add(r)
        return aggregator.finish(model, state, before_adjust)

    def round_sums(self, rnd: int, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """The running sums round `rnd` folds every client result into, besides the weighted average."""
        return {}

    def fold(self, sums: dict[str, Any], result: ClientResult) -> None:
        """Add one client's result to the round's `sums` (see :meth:`round_sums`)."""

    def finish_aggregate(self, rnd: int, model: nn.Module, averaged: dict[str, torch.Tensor], clients: int,
                         sums: dict[str, Any], state: dict[str, Any],
                         before_adjust: Callable[[], None] | None = None) -> dict[str, float]:
        """Make the sample-weighted average of the `clients` states (`averaged`) and the round's `sums` the
        new global `model` and `state`; return metrics to log (see :meth:`Aggregator.finish`)."""
        model.load_state_dict(averaged)
        dense = float(clients * state_bytes(averaged))  # every client sends and receives the dense model
        return {"comm/upload_bytes": dense, "comm/download_bytes": dense}

    def setup_payload(self, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """Data for a one-off exchange with clients before round 1 (e.g. FedTiny's candidate masks);
        empty = no setup exchange. Called while no round has run."""
        return {}

    def finish_setup(self, model: nn.Module, results: list[ClientResult], state: dict[str, Any]) -> dict[str, float]:
        """Fold the clients' setup answers into the global `model` and `state`; return metrics to log."""
        return {}

    # ---- client side -------------------------------------------------------------------------
    def client_setup(self, model: nn.Module, payload: dict[str, Any], batches: BatchSource) -> dict[str, Any]:
        """A client's answer to :meth:`setup_payload` (it trains nothing)."""
        return {}

    def on_client_start(self, model: nn.Module, payload: dict[str, Any]) -> None:
        """Called once after the client loaded the global weights (e.g. apply the mask)."""

    def extra_loss(self, model: nn.Module, payload: dict[str, Any]) -> torch.Tensor | None:
        """A term added to the task loss at every local step (e.g. BaE's extrusion loss)."""
        return None

    def step_lr(self, base_lr: float, step: int, total_steps: int, model: nn.Module,
                payload: dict[str, Any]) -> float:
        """The learning rate of local step `step` of `total_steps` (e.g. BaE's budget-aware lr)."""
        return base_lr

    def on_before_step(self, model: nn.Module, payload: dict[str, Any]) -> None:
        """Called after backward, before every optimizer step (e.g. mask the gradients)."""

    def on_after_step(self, model: nn.Module, payload: dict[str, Any]) -> None:
        """Called after every optimizer step (e.g. re-zero masked weights)."""

    def on_step_end(self, model: nn.Module, payload: dict[str, Any], steps_done: int, total_steps: int,
                    batches: BatchSource) -> None:
        """Called after every local step (after :meth:`on_after_step`) with the steps done so far out of
        `total_steps`; ``batches()`` is a fresh pass over the client's data (e.g. FedDST's mid-training
        prune-and-grow)."""

    def client_upload(self, model: nn.Module, payload: dict[str, Any], batches: Batches) -> dict[str, Any]:
        """Extra data the client sends back (e.g. top-k gradients of inactive weights)."""
        return {}
