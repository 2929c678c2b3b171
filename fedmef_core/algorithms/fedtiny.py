"""FedTiny (Huang et al., ICDCS 2023): server-side prune-and-grow from uploaded top-k gradients.

On an adjustment round each client, after local training, computes the gradient of one mini-batch
and uploads, per layer, the k_l largest-magnitude gradients of *inactive* weights (values + int32
indices). The server averages the weights (FedAvg), sums the uploaded gradients weighted by client
sample counts, prunes the k_l smallest-magnitude active weights and grows the k_l inactive positions
with the largest summed gradient magnitude (new weights = 0).

Not implemented: FedTiny's adaptive-BN selection of the initial coarse mask (the start is a random
ERK mask, as for every method here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, ClientResult
from fedmef_core.algorithms.static import MaskedAlgorithm, batch_gradients
from fedmef_core.models import prunable_weights
from fedmef_core.sparse import prune_and_grow


class FedTiny(MaskedAlgorithm):
    name = "fedtiny"
    adjusts = True

    def client_upload(self, model: nn.Module, payload: dict[str, Any], batches: Batches) -> dict[str, Any]:
        if not payload.get("adjust"):
            return {}
        grads = batch_gradients(model, batches)
        idx_out, val_out = {}, {}
        for name, g in grads.items():
            k = int(payload["k"][name])
            inactive = ~payload["masks"][name].flatten()
            cand = inactive.nonzero().flatten()
            vals = g.flatten()[cand]
            top = torch.sort(vals.abs(), descending=True, stable=True).indices[:k]
            idx_out[name] = cand[top].to(torch.int32)
            val_out[name] = vals[top].to(torch.float32)
        return {"grad_idx": idx_out, "grad_val": val_out}

    def adjust(self, rnd: int, model: nn.Module, results: list[ClientResult],
               state: dict[str, Any]) -> dict[str, float]:
        masks = state["masks"]
        counts = self.move_counts(rnd, masks)
        weights = prunable_weights(model)
        total = float(sum(r.num_samples for r in results))
        new_masks, pruned, grown = {}, 0, 0
        for name, mask in masks.items():
            scores = torch.zeros(mask.numel(), dtype=torch.float64)
            for r in results:
                scores.index_add_(0, r.upload["grad_idx"][name].long(),
                                  r.upload["grad_val"][name].double() * (r.num_samples / total))
            new, p, g = prune_and_grow(weights[name], mask, scores.abs().view(mask.shape), counts[name])
            new_masks[name], pruned, grown = new, pruned + p, grown + g
        state["masks"] = new_masks
        return {"pruned": float(pruned), "grown": float(grown)}
