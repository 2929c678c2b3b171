"""A client's memory budget on its side: how it trains this round (:class:`ClientPlan`, chosen by the server's
:class:`~fedmef_core.devices.Fleet`) and the guard that holds it to its budget while it trains.

:class:`MemoryGuard` measures what the client holds at every local step, as the accountant
(:mod:`fedmef_core.memory`) defines it: the weights as stored (sparse at the configured density) plus every
storage autograd saves for backward, each counted once, the model's own tensors excluded — counted by a
saved-tensor hook around the forward pass, before backward frees them. With ``bound: total`` the dense
gradients and the optimizer's buffers are added. A step above the budget raises :class:`OverBudgetError`
right after its forward pass, before backward: the client fails as a device that ran out of memory would. On
CUDA ``torch.cuda.max_memory_allocated`` over each forward pass is recorded beside it (``cuda_peak_mib``: reported,
not enforced, since it also holds the allocator's temporaries and the dense weights, which the planner does not
model; not yet checked on a GPU).

The hook costs one Python call per saved tensor; clients without a budget run no hook at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fedmef_core.config import ExperimentConfig
from fedmef_core.memory import model_storages, weight_bytes

MIB = 2**20


class OverBudgetError(RuntimeError):
    """A client's step held more than its device's budget (the device would have run out of memory)."""


@dataclass(frozen=True)
class ClientPlan:
    """How one client with a budget trains this round: its batch and SAP γ, and what bounds it."""

    tier: str
    budget_mib: float
    batch_size: int
    gamma: float | None  # None: the method runs no SAP
    bound: str  # "footprint" or "total"
    predicted_mib: float  # the planner's figure for the bounded quantity at this batch (micro-batch) and γ
    enforce: bool = True
    micro_batch: int | None = None  # policy accumulate: the batch trained in micro-batches of this size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientPlan:
        return cls(**d)

    def applied(self, config: ExperimentConfig) -> ExperimentConfig:
        """``config`` as this client trains it: its batch size (and micro-batch) and (with SAP) its γ."""
        update: dict[str, Any] = {}
        fed = {"batch_size": self.batch_size, "micro_batch": self.micro_batch or config.federation.micro_batch}
        if fed != {k: getattr(config.federation, k) for k in fed}:
            update["federation"] = config.federation.model_copy(update=fed)
        if self.gamma is not None and self.gamma != config.sap.gamma:
            update["sap"] = config.sap.model_copy(update={"gamma": self.gamma})
        return config.model_copy(update=update) if update else config


class MemoryGuard:
    """Measures what a client holds at each step and fails the step that exceeds its budget (module doc)."""

    def __init__(self, model: nn.Module, plan: ClientPlan, config: ExperimentConfig, client_id: int = -1):
        density = config.pruning.density
        self.plan, self.client_id = plan, client_id
        self.budget_bytes = int(plan.budget_mib * MIB)
        self.fixed_bytes = weight_bytes(model, density=density if density < 1 else None)
        if plan.bound == "total":
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            self.fixed_bytes += params * (2 if config.federation.momentum > 0 else 1)
        self._exclude = model_storages(model)
        self.held_bytes = 0  # the largest step so far
        self.steps = 0
        self.cuda_peak_bytes: int | None = None

    @contextmanager
    def step(self, device: torch.device) -> Iterator[None]:
        """Around one step's forward pass (and loss): count what it saves, then check the budget."""
        seen: set[int] = set()
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._exclude and ptr not in seen:
                seen.add(ptr)
                saved += storage.nbytes()
            return t

        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
        if cuda:
            peak = int(torch.cuda.max_memory_allocated(device))
            self.cuda_peak_bytes = max(self.cuda_peak_bytes or 0, peak)
        held = self.fixed_bytes + saved
        self.held_bytes = max(self.held_bytes, held)
        self.steps += 1
        if held > self.budget_bytes:
            raise OverBudgetError(
                f"client {self.client_id} ({self.plan.tier}) held {held / MIB:.2f} MiB at local step {self.steps} "
                f"(batch {self.plan.batch_size}"
                + (f" in micro-batches of {self.plan.micro_batch}" if self.plan.micro_batch else "")
                + (f", SAP gamma {self.plan.gamma:g}" if self.plan.gamma is not None else "")
                + f"), over its {self.plan.budget_mib:g} MiB budget ({self.plan.bound}; planned "
                f"{self.plan.predicted_mib:.2f} MiB)"
            )

    def report(self) -> dict[str, float]:
        """What the client held at its largest step, in MiB, beside its budget (a ClientResult's ``memory``)."""
        out = {"held_mib": self.held_bytes / MIB, "budget_mib": self.plan.budget_mib,
               "predicted_mib": self.plan.predicted_mib}
        if self.cuda_peak_bytes is not None:
            out["cuda_peak_mib"] = self.cuda_peak_bytes / MIB
        return out


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
