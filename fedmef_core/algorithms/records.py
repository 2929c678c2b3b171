"""What the server keeps, broadcasts and receives: typed records every method shares.

- :class:`ServerState`: what a method keeps between rounds (saved in every checkpoint as its wire dict,
  ``{"masks": ...}``; a method may keep a subclass, its ``state_type``);
- :class:`RoundPayload`: what the round's clients receive besides the global weights (a method may
  broadcast a subclass, e.g. FedMef's marked weights);
- :class:`ClientResult`: what a client sends back; its ``upload`` is the method's own record (top-k
  gradients, a mask, ...), or ``None``.

Each converts to and from a plain dict (:class:`~fedmef_core.wire.Record`) for checkpoints, exchange files
and workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedmef_core.sparse import Masks
from fedmef_core.wire import Record


@dataclass
class ServerState(Record):
    """What the server keeps between rounds."""

    masks: Masks | None = None  # the global mask of a sparse method (bool per prunable weight); None: dense
    candidates: list[Masks] | None = None  # FedTiny's initial-mask candidates, until the setup exchange chose one


@dataclass
class RoundPayload(Record):
    """What a round's clients receive besides the global weights."""

    masks: Masks | None = None  # the global mask (sparse methods)
    adjust: bool = False  # an adjustment round: the mask changes after it
    k: dict[str, int] | None = None  # on adjustment rounds: weights to move per layer


@dataclass
class ClientResult(Record):
    """What a client sends back after local training (tensors on CPU)."""

    client_id: int
    num_samples: int
    state: dict[str, torch.Tensor]
    train_loss: float
    steps: int
    upload: Record | None = None  # the method's own data (e.g. top-k gradients); None: nothing beyond the state
    memory: dict[str, float] = field(default_factory=dict)  # what a client with a budget held (budget.MemoryGuard)
    lr_mean: float = 0.0  # the mean learning rate of its local steps

    def to_dict(self) -> dict[str, Any]:
        return self.to_wire()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientResult:
        return cls.from_wire(d)
