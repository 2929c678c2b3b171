"""FedAvg-static, and `MaskedAlgorithm`: the mask plumbing every sparse method shares.

The server keeps ``state.masks`` (bool per prunable weight) and broadcasts it each round; a client's
:class:`MaskedRound` zeroes masked weights on start, masks gradients before and re-zeroes weights after
every optimizer step; aggregation re-applies the mask. Subclasses set ``adjusts = True`` and implement
:meth:`~MaskedAlgorithm.adjust_from_sums` (and, where they need it, a client round of their own) to change
the averaged model's mask on adjustment rounds; what the server needs from the clients for that is folded
into running sums as each result arrives (:meth:`~MaskedAlgorithm.adjust_sums`,
:meth:`~MaskedAlgorithm.fold_adjust`, held in :class:`MaskedSums`), so no round holds all the client results
at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, ClientResult, ClientRound, FederatedAlgorithm
from fedmef_core.algorithms.records import RoundPayload, ServerState
from fedmef_core.config import ExperimentConfig
from fedmef_core.models import prunable_weights
from fedmef_core.models.nsconv import attach_masks, centre_active, effective_grads, recording_effective_grads
from fedmef_core.sparse import (
    Masks,
    active_counts,
    apply_masks,
    cosine_alpha,
    density_metrics,
    is_adjust_round,
    mask_gradients,
    move_count,
    random_masks,
    shapes_of,
    state_bytes,
)
from fedmef_core.wire import Record


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a record or a nested dict/list (bool tensors as bitmaps)."""
    if isinstance(obj, Record):
        return tensor_bytes(obj.to_wire())
    if isinstance(obj, torch.Tensor):
        return -(-obj.numel() // 8) if obj.dtype == torch.bool else obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def growth_scores(model: nn.Module, weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The per-weight gradients growth ranks, after a backward: ``weight.grad`` of a plain Conv2d/Linear,
    ``dL/dW_hat`` of an NSConv (its raw gradient ties across each output channel's inactive positions;
    the model must have run under :func:`recording_effective_grads`). Masked positions included."""
    standardized = effective_grads(model)
    grads = {k: standardized.get(k, w.grad) for k, w in weights.items()}
    return {k: g.detach() for k, g in grads.items() if g is not None}


def batch_gradients(model: nn.Module, batches: Batches) -> dict[str, torch.Tensor]:
    """:func:`growth_scores` of the task loss on one mini-batch, for every prunable weight (on CPU).

    The model's buffers (BatchNorm statistics) are restored afterwards, so the upload does not change
    the client's state.
    """
    x, y = next(iter(batches))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    weights = prunable_weights(model)
    model.zero_grad(set_to_none=True)
    with recording_effective_grads(model):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = {k: g.cpu().clone() for k, g in growth_scores(model, weights).items()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return grads



@dataclass
class MaskedSums:
    """A sparse round's running sums (never leave the server)."""

    masks: Masks  # the round's global mask: what the clients' weights are sparse on
    download_each: int  # bytes each client received
    adjusting: bool = False  # an adjustment round
    adjustment: Any = None  # on adjustment rounds: the method's own sums (see MaskedAlgorithm.adjust_sums)
    samples: int = 0  # the samples of the clients folded so far
    upload_bytes: int = 0


class MaskedRound(ClientRound):
    """A client's round on the broadcast mask: masked weights stay zero, before and after every step."""

    def __init__(self, config: ExperimentConfig, model: nn.Module, payload: RoundPayload):
        super().__init__(config, model, payload)
        self.weights = prunable_weights(model)
        device = next(iter(self.weights.values())).device
        self.masks: Masks = {k: m.to(device) for k, m in self.payload.masks.items()}  # a method may swap it midway
        apply_masks(self.weights, self.masks)
        attach_masks(model, self.masks)

    def before_step(self) -> None:
        mask_gradients(self.weights, self.masks)

    def after_step(self) -> None:
        apply_masks(self.weights, self.masks)


class MaskedAlgorithm(FederatedAlgorithm):
    """FedAvg on a fixed random ERK/uniform mask (FedAvg-static); the base of the dynamic methods."""

    name = "fedavg_static"
    client_round_type = MaskedRound
    adjusts = False  # subclasses that change the mask set True
    # the mask adjustment prunes the averaged model (FedTiny, FedMef, PruneFL: the engine measures the prune drop
    # right before it); False: the new mask and weights come from the clients' own (FedDST)
    prunes_average = True

    # ---- schedule ----------------------------------------------------------------------------
    def adjusting(self, rnd: int) -> bool:
        p = self.config.pruning
        return self.adjusts and is_adjust_round(rnd, p.adjust_interval, p.adjust_until)

    def alpha(self, rnd: int) -> float:
        p = self.config.pruning
        return cosine_alpha(p.adjust_alpha, rnd, p.adjust_until)

    def move_counts(self, rnd: int, masks: Masks) -> dict[str, int]:
        """k_l = round(alpha_t * active_l) per layer."""
        a = self.alpha(rnd)
        return {k: move_count(a, int(m.sum()), m.numel()) for k, m in masks.items()}

    # ---- server ------------------------------------------------------------------------------
    def init_server_state(self, model: nn.Module, generator: torch.Generator) -> ServerState:
        masks = self.initial_masks(model, generator)
        apply_masks(prunable_weights(model), masks)
        centre_active(model, masks)
        return self.state_type(masks=masks)

    def initial_masks(self, model: nn.Module, generator: torch.Generator) -> Masks:
        """A random mask with the configured per-layer densities (ERK or uniform)."""
        shapes = shapes_of(prunable_weights(model))
        p = self.config.pruning
        return random_masks(shapes, active_counts(shapes, p.density, p.distribution), generator)

    def bind_state(self, model: nn.Module, state: ServerState) -> None:
        attach_masks(model, state.masks)  # zeroed weights alone do not make an NSConv sparse

    def round_payload(self, rnd: int, model: nn.Module, state: ServerState) -> RoundPayload:
        if not self.adjusting(rnd):
            return RoundPayload(masks=state.masks)
        return RoundPayload(masks=state.masks, adjust=True, k=self.move_counts(rnd, state.masks))

    def adjust_download_bytes(self, counts: dict[str, int]) -> int:
        """Bytes an adjustment round's payload adds per client (the mask itself travels as the sparse weights'
        index)."""
        return 0

    def round_sums(self, rnd: int, model: nn.Module, state: ServerState) -> MaskedSums:
        masks = state.masks
        adjust = self.adjusting(rnd)
        extra = self.adjust_download_bytes(self.move_counts(rnd, masks)) if adjust else 0
        sums = MaskedSums(masks=masks, download_each=state_bytes(model.state_dict(), masks) + extra, adjusting=adjust)
        if adjust:
            sums.adjustment = self.adjust_sums(rnd, model, state)
        return sums

    def fold(self, sums: MaskedSums, result: ClientResult) -> None:
        sums.samples += result.num_samples
        sums.upload_bytes += state_bytes(result.state, sums.masks) + tensor_bytes(result.upload)
        if sums.adjusting:
            self.fold_adjust(sums, result)

    def finish_aggregate(self, rnd: int, model: nn.Module, averaged: dict[str, torch.Tensor], clients: int,
                         sums: MaskedSums, state: ServerState,
                         before_adjust: Callable[[], None] | None = None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.load_average(model, averaged, state.masks)
        if sums.adjusting:
            if self.prunes_average and before_adjust is not None:
                before_adjust()  # the averaged model, right before its prune-and-grow
            metrics.update(self.adjust_from_sums(rnd, model, sums, state))
            metrics.update(adjusted=1.0, alpha=self.alpha(rnd))
        metrics.update(density_metrics(state.masks))
        metrics.update({"comm/upload_bytes": float(sums.upload_bytes),
                        "comm/download_bytes": float(clients * sums.download_each)})
        return metrics

    def load_average(self, model: nn.Module, averaged: dict[str, torch.Tensor], masks: Masks) -> None:
        """Make the averaged state the global model, then re-apply the mask."""
        model.load_state_dict(averaged)
        apply_masks(prunable_weights(model), masks)

    # ---- adjustment rounds: what a method sums over the clients, and what it does with the sums ----
    def adjust_sums(self, rnd: int, model: nn.Module, state: ServerState) -> Any:
        """The method's running sums of an adjustment round (``sums.adjustment``, e.g. summed gradient
        scores), made before any result arrives from the global `model` the clients received."""
        return None

    def fold_adjust(self, sums: MaskedSums, result: ClientResult) -> None:
        """Add one client's adjustment-round upload to ``sums.adjustment``, weighted by ``result.num_samples``
        (the clients' total is ``sums.samples`` once all are folded)."""

    def adjust_from_sums(self, rnd: int, model: nn.Module, sums: MaskedSums, state: ServerState) -> dict[str, float]:
        """Replace ``state.masks`` from the round's `sums` (the global `model` holds the average on the old mask
        and is changed to match); return pruned/grown counts."""
        return {"pruned": 0.0, "grown": 0.0}
