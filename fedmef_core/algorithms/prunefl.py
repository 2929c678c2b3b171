"""PruneFL-style adaptive pruning (after Jiang et al., TNNLS 2022), kept simple.

What is implemented: on an adjustment round every client accumulates the squared gradient of every
prunable weight (masked ones included, before the gradient is masked) over all its local steps and
uploads it densely (fp32). On an NSConv layer that is the gradient w.r.t. the standardized weight
(see :func:`~fedmef_core.algorithms.static.growth_scores`; the raw one ties within each output
channel); under fp16 loss scaling those NSConv scores keep the loss scale (they are not optimizer
gradients, which the loop unscales), so use fp32 or bf16 for PruneFL on NSConv models. The server
averages these importances (sample-weighted) and swaps the k = sum_l k_l least important active
weights for the k most important inactive ones (new weights = 0).
With `pruning.prunefl_reallocate` (default) the ranking is global over all layers, so weights move
between layers while the global density stays exactly d (each layer keeps at least its most important
weight); otherwise each layer swaps its own k_l.

What differs from the paper: the time cost per weight is taken as uniform (no per-layer timing
measurements), the density is fixed at d instead of chosen by the cost model, there is no initial
single-client pruning phase, and adjustments follow the shared ΔR / R_end / alpha_t schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, ClientResult
from fedmef_core.algorithms.records import RoundPayload, ServerState
from fedmef_core.algorithms.static import MaskedAlgorithm, MaskedRound, MaskedSums, growth_scores
from fedmef_core.config import ExperimentConfig
from fedmef_core.models import prunable_weights
from fedmef_core.models.nsconv import grow_at_channel_mean, record_effective_grads
from fedmef_core.sparse import apply_masks, grow, mask_gradients, prune
from fedmef_core.wire import Record


@dataclass
class SquaredGradients(Record):
    """A client's upload on an adjustment round: every prunable weight's squared gradient, summed over its
    local steps (dense, fp32)."""

    grad2: dict[str, torch.Tensor]


@dataclass
class Importance:
    """An adjustment round's sums: every weight's sample-weighted summed squared gradient (float64)."""

    importance: dict[str, torch.Tensor]


class PruneFLRound(MaskedRound):
    """A client's round: on adjustment rounds every step also adds up the squared gradients."""

    def __init__(self, config: ExperimentConfig, model: nn.Module, payload: RoundPayload):
        super().__init__(config, model, payload)
        self.grad2 = {k: torch.zeros_like(w) for k, w in self.weights.items()} if payload.adjust else None
        record_effective_grads(model, self.grad2 is not None)  # every step of the round is a scoring step

    def before_step(self) -> None:
        if self.grad2 is not None:
            for k, g in growth_scores(self.model, self.weights).items():
                self.grad2[k] += g ** 2
        mask_gradients(self.weights, self.masks)

    def upload(self, batches: Batches) -> SquaredGradients | None:
        if self.grad2 is None:
            return None
        record_effective_grads(self.model, False)
        return SquaredGradients(grad2={k: v.detach().cpu().float() for k, v in self.grad2.items()})


class PruneFL(MaskedAlgorithm):
    name = "prunefl"
    client_round_type = PruneFLRound
    adjusts = True

    def adjust_sums(self, rnd: int, model: nn.Module, state: ServerState) -> Importance:
        return Importance(importance={k: torch.zeros(m.shape, dtype=torch.float64) for k, m in state.masks.items()})

    def fold_adjust(self, sums: MaskedSums, result: ClientResult) -> None:
        upload: SquaredGradients = result.upload
        for k, imp in sums.adjustment.importance.items():
            imp += upload.grad2[k].double() * result.num_samples

    def adjust_from_sums(self, rnd: int, model: nn.Module, sums: MaskedSums, state: ServerState) -> dict[str, float]:
        masks = state.masks
        counts = self.move_counts(rnd, masks)
        imp = sums.adjustment.importance
        if self.config.pruning.prunefl_reallocate:
            new_masks = self._global_swap(masks, imp, sum(counts.values()))
        else:
            new_masks = {}
            for k, m in masks.items():
                pruned, _ = prune(imp[k], m, counts[k])
                new_masks[k], _ = grow(imp[k], pruned, counts[k], eligible=~m)
        apply_masks(prunable_weights(model), new_masks)
        grow_at_channel_mean(model, masks, new_masks)
        state.masks = new_masks
        moved = sum(int((masks[k] & ~new_masks[k]).sum()) for k in masks)
        return {"pruned": float(moved), "grown": float(moved)}

    @staticmethod
    def _global_swap(masks, imp, k: int):
        names = list(masks)
        flat_m = torch.cat([masks[n].flatten() for n in names])
        flat_s = torch.cat([imp[n].flatten() for n in names])
        # protect the most important active weight of every layer, so no layer is emptied
        protect = torch.zeros_like(flat_m)
        start = 0
        for n in names:
            m, s = masks[n].flatten(), imp[n].flatten()
            act = m.nonzero().flatten()
            protect[start + act[torch.argmax(s[act])]] = True
            start += m.numel()
        k = min(k, int((flat_m & ~protect).sum()), int((~flat_m).sum()))
        pruned, _ = prune(flat_s, flat_m & ~protect, k)
        new, _ = grow(flat_s, pruned | protect, k, eligible=~flat_m)
        out, start = {}, 0
        for n in names:
            out[n] = new[start : start + masks[n].numel()].view(masks[n].shape).clone()
            start += masks[n].numel()
        return out
