"""FedMef: FedTiny-style adjustment + budget-aware extrusion (BaE).

On an adjustment round the server marks theta_low: per layer the k_l smallest-magnitude active
weights of the global model (exactly those the coming prune would remove) and broadcasts their
indices. During that round's local training clients add
``lambda * sum_l ||theta_low,l||_2`` (or its square) to the loss and use the budget-aware lr

    beta_t = p(t) * (2 sigmoid(||theta_low||_1) - 1) * eta_0,   p(t) = (2T - 2t) / (2T - t)
    lr_t   = min(xi, max(eta_t, psi * beta_t))

(T = local steps of the round, eta_0 = `federation.lr`, eta_t the round's scheduled lr). Upload,
prune and grow are FedTiny's. Scaled activation pruning lives in the SAP modules, not here.

The pieces: :class:`FedMef` is FedTiny's server strategy that also broadcasts theta_low
(:class:`FedMefPayload`; :class:`FedMefState` keeps it until the round's aggregation); on the client,
:class:`BaE` is the local regulariser (extra loss, lr, norms) that :class:`FedMefRound` plugs into FedTiny's
client round.

Instrumentation (round metrics of adjustment rounds): ``bae/low_norm_start`` and ``bae/low_norm_end``,
sum_l ||theta_low,l||_2 at the start and the end of local training (two floats per client, not counted
as communication; the sample-weighted mean over clients), and ``bae/low_norm_global``, the same norm in
the averaged global model right before the prune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, ClientResult
from fedmef_core.algorithms.fedtiny import FedTiny, FedTinyRound, GradientScores, TopGradients
from fedmef_core.algorithms.records import RoundPayload, ServerState
from fedmef_core.algorithms.static import MaskedSums
from fedmef_core.config import ExperimentConfig
from fedmef_core.models import prunable_weights
from fedmef_core.sparse import INDEX_BYTES, Masks, smallest_active


def budget_profile(step: int, total: int) -> float:
    """p(t) = (2T - 2t) / (2T - t): 1 at the first step, 0 at the end of the budget."""
    t, T = min(step, total), max(total, 1)
    return (2 * T - 2 * t) / (2 * T - t)


def marked_weights(model: nn.Module, masks: Masks, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """theta_low: per layer, the flat positions of the k_l smallest-magnitude active weights of `model`."""
    weights = prunable_weights(model)
    return {k: smallest_active(weights[k], m, counts[k]) for k, m in masks.items()}


@dataclass
class FedMefState(ServerState):
    """The masks, plus theta_low from the broadcast of an adjustment round until its aggregation starts."""

    marked: dict[str, torch.Tensor] | None = None


@dataclass
class FedMefPayload(RoundPayload):
    """FedTiny's payload plus, on adjustment rounds, theta_low."""

    low: dict[str, torch.Tensor] | None = None  # the marked weights' flat positions per layer


@dataclass
class FedMefUpload(TopGradients):
    """FedTiny's upload plus BaE's instrumentation (two floats, not counted as communication)."""

    low_norm_start: float
    low_norm_end: float


@dataclass
class FedMefSums(GradientScores):
    """FedTiny's sums plus what the BaE metrics need."""

    marked: dict[str, torch.Tensor]  # theta_low as broadcast: for bae/low_norm_global
    low_norm_start: list[float]  # each client's norm times its samples
    low_norm_end: list[float]


class BaE:
    """Budget-aware extrusion on one client for one round: the loss term and lr that shrink theta_low.

    `weights`: the client's prunable weights; `low`: theta_low's positions per layer (FedMefPayload.low).
    ``start_norm`` is sum_l ||theta_low,l||_2 when it starts, ``lr_trace`` the lr of every step so far.
    """

    def __init__(self, config: ExperimentConfig, weights: dict[str, nn.Parameter], low: dict[str, torch.Tensor]):
        self.pruning, self.base_lr = config.pruning, config.federation.lr
        self.weights = weights
        self.low = {k: idx.to(weights[k].device) for k, idx in low.items()}
        self.lr_trace: list[float] = []
        self.start_norm = self.measured_norm()

    def _marked(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.weights[k].flatten(), idx) for k, idx in self.low.items()]

    def norm(self, p: int = 2) -> torch.Tensor:
        """sum_l ||theta_low,l||_p of the client's current weights."""
        return sum((w[i].norm(p=p) for w, i in self._marked()))

    @torch.no_grad()
    def measured_norm(self) -> float:
        return float(self.norm())

    def loss(self) -> torch.Tensor:
        """lambda * sum_l ||theta_low,l||_2 (or its square, `pruning.bae_norm: squared_l2`)."""
        if self.pruning.bae_norm == "squared_l2":
            total = sum((w[i].pow(2).sum() for w, i in self._marked()))
        else:
            total = self.norm()
        return self.pruning.bae_lambda * total

    def lr(self, round_lr: float, step: int, total_steps: int) -> float:
        """lr_t = min(xi, max(eta_t, psi * beta_t)) (see the module doc)."""
        cfg = self.pruning
        with torch.no_grad():
            l1 = float(self.norm(p=1))
        beta = budget_profile(step, total_steps) * (2 / (1 + math.exp(-l1)) - 1) * self.base_lr
        lr = min(cfg.bae_xi, max(round_lr, cfg.bae_psi * beta))
        self.lr_trace.append(lr)
        return lr


class FedMefRound(FedTinyRound):
    """FedTiny's client round with BaE plugged in on adjustment rounds."""

    payload: FedMefPayload

    def __init__(self, config: ExperimentConfig, model: nn.Module, payload: FedMefPayload):
        super().__init__(config, model, payload)
        self.bae = None if payload.low is None else BaE(config, self.weights, payload.low)

    def lr(self, base_lr: float, step: int, total_steps: int) -> float:
        return base_lr if self.bae is None else self.bae.lr(base_lr, step, total_steps)

    def extra_loss(self) -> torch.Tensor | None:
        return None if self.bae is None else self.bae.loss()

    def upload(self, batches: Batches) -> TopGradients | None:
        top = super().upload(batches)
        if self.bae is None:
            return top
        return FedMefUpload(grad_idx=top.grad_idx, grad_val=top.grad_val, low_norm_start=self.bae.start_norm,
                            low_norm_end=self.bae.measured_norm())


class FedMef(FedTiny):
    name = "fedmef"
    client_round_type = FedMefRound
    state_type = FedMefState

    def round_payload(self, rnd: int, model: nn.Module, state: FedMefState) -> FedMefPayload:
        p = super().round_payload(rnd, model, state)
        if p.adjust:
            state.marked = marked_weights(model, state.masks, p.k)  # for bae/low_norm_global (adjust_sums)
        return FedMefPayload(masks=p.masks, adjust=p.adjust, k=p.k, low=state.marked if p.adjust else None)

    def adjust_download_bytes(self, counts: dict[str, int]) -> int:
        return INDEX_BYTES * sum(counts.values())

    def adjust_sums(self, rnd: int, model: nn.Module, state: FedMefState) -> FedMefSums:
        marked, state.marked = state.marked, None  # what round_payload sent moves into the round's sums
        if marked is None:  # this server did not broadcast the round (the same model marks the same weights)
            marked = marked_weights(model, state.masks, self.move_counts(rnd, state.masks))
        return FedMefSums(scores=super().adjust_sums(rnd, model, state).scores, marked=marked,
                          low_norm_start=[], low_norm_end=[])

    def fold_adjust(self, sums: MaskedSums, result: ClientResult) -> None:
        super().fold_adjust(sums, result)
        upload: FedMefUpload = result.upload
        sums.adjustment.low_norm_start.append(upload.low_norm_start * result.num_samples)
        sums.adjustment.low_norm_end.append(upload.low_norm_end * result.num_samples)

    def adjust_from_sums(self, rnd: int, model: nn.Module, sums: MaskedSums, state: ServerState) -> dict[str, float]:
        weights = prunable_weights(model)
        bae: FedMefSums = sums.adjustment
        metrics = {"bae/low_norm_start": sum(bae.low_norm_start) / sums.samples,
                   "bae/low_norm_end": sum(bae.low_norm_end) / sums.samples,
                   "bae/low_norm_global": float(sum(weights[k].detach().flatten()[i].norm()
                                                    for k, i in bae.marked.items()))}
        return {**metrics, **super().adjust_from_sums(rnd, model, sums, state)}
