"""FedDST (Bibikar et al., AAAI 2022): client-side prune-and-grow, server-side union and prune-back.

On an adjustment round each client adjusts its mask part-way through local training: after half its
local epochs (rounded down) when ``local_epochs >= 2``, else after half its local steps (rounded down,
at least one). It removes its k_l smallest-magnitude active weights per layer and activates as many
previously inactive positions with the largest gradient magnitude on one mini-batch (per weight, see
:func:`~fedmef_core.algorithms.static.growth_scores`; new weights = 0), then keeps training on the new
mask, so the grown weights learn before it uploads its weights and its new mask (bitmap). (The
authors' code adjusts after half the local epochs.)
The server averages each coordinate over the clients whose mask holds it (sample-weighted), takes
the union of the client masks and prunes it back, per layer, to the layer's previous number of
active weights by magnitude (ties: the coordinate held by more clients' samples wins, then the
lower index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, BatchSource, ClientResult
from fedmef_core.algorithms.static import MaskedAlgorithm, batch_gradients
from fedmef_core.models import prunable_weights
from fedmef_core.models.nsconv import attach_masks, grow_at_channel_mean
from fedmef_core.sparse import Masks, apply_masks, prune_and_grow


class FedDST(MaskedAlgorithm):
    name = "feddst"
    adjusts = True

    def adjust_step(self, total_steps: int) -> int:
        """The number of local steps after which a client adjusts its mask (see the module doc)."""
        epochs = self.config.federation.local_epochs
        if epochs >= 2:
            return epochs // 2 * (total_steps // epochs)
        return max(1, total_steps // 2)

    def on_step_end(self, model: nn.Module, payload: dict[str, Any], steps_done: int, total_steps: int,
                    batches: BatchSource) -> None:
        if payload.get("adjust") and steps_done == self.adjust_step(total_steps):
            self._masks = self.client_adjust(model, payload, batches())

    def client_adjust(self, model: nn.Module, payload: dict[str, Any], batches: Batches) -> Masks:
        """Prune the k_l smallest active weights, grow the k_l best-scored inactive ones (at 0); the
        masking hooks and the NSConv layers use the returned mask from the next step on."""
        grads = batch_gradients(model, batches)
        new_masks = {}
        for name, mask in self._masks.items():
            new, _, _ = prune_and_grow(self._weights[name], mask, grads[name].abs(), int(payload["k"][name]))
            new_masks[name] = new.to(mask.device)
        grow_at_channel_mean(model, self._masks, new_masks)
        attach_masks(model, new_masks)
        return new_masks

    def client_upload(self, model: nn.Module, payload: dict[str, Any], batches: Batches) -> dict[str, Any]:
        if not payload.get("adjust"):
            return {}
        return {"mask": {k: m.cpu() for k, m in self._masks.items()}}

    def adjust_sums(self, rnd: int, state: dict[str, Any]) -> dict[str, Any]:
        """Per coordinate: the sample-weighted sum of the clients' weights where their mask holds it (`num`),
        and the samples whose mask holds it (`votes`, exact integers in float64)."""
        zeros = {k: torch.zeros(m.shape, dtype=torch.float64) for k, m in state["masks"].items()}
        return {"num": zeros, "votes": {k: z.clone() for k, z in zeros.items()}}

    def fold_adjust(self, sums: dict[str, Any], result: ClientResult) -> None:
        for name, num in sums["num"].items():
            m = result.upload["mask"][name]
            num += result.state[name].double() * m * result.num_samples
            sums["votes"][name] += m.double() * result.num_samples

    def adjust_aggregate(self, rnd: int, model: nn.Module, averaged: dict[str, torch.Tensor], sums: dict[str, Any],
                         state: dict[str, Any], before_adjust: Callable[[], None] | None = None) -> dict[str, float]:
        """Union, coordinate-wise average and prune-back in one pass (no separate averaged model, so
        ``before_adjust`` is not called)."""
        old = state["masks"]
        new_masks, pruned, grown = {}, 0, 0
        for name, mask in old.items():
            num, votes = sums["num"][name], sums["votes"][name]
            value = torch.where(votes > 0, num / votes.clamp_min(1), torch.zeros_like(num))
            union = (votes > 0).flatten()
            cand = union.nonzero().flatten()
            keep_n = int(mask.sum())
            # rank by |value| then votes, lower index first: two stable sorts (secondary key first)
            order = torch.sort(votes.flatten()[cand], descending=True, stable=True).indices
            cand = cand[order]
            order = torch.sort(value.abs().flatten()[cand], descending=True, stable=True).indices
            keep = cand[order[:keep_n]]
            new = torch.zeros(mask.numel(), dtype=torch.bool)
            new[keep] = True
            new = new.view(mask.shape)
            averaged[name] = (value * new).to(averaged[name].dtype)
            new_masks[name] = new
            pruned += int((mask & ~new).sum())
            grown += int((new & ~mask).sum())
        model.load_state_dict(averaged)
        state["masks"] = new_masks
        apply_masks(prunable_weights(model), new_masks)
        return {"pruned": float(pruned), "grown": float(grown)}
