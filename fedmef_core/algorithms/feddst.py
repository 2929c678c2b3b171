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

from dataclasses import dataclass

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, BatchSource, ClientResult
from fedmef_core.algorithms.records import ServerState
from fedmef_core.algorithms.static import MaskedAlgorithm, MaskedRound, MaskedSums, batch_gradients
from fedmef_core.models import prunable_weights
from fedmef_core.models.nsconv import attach_masks, grow_at_channel_mean
from fedmef_core.sparse import Masks, apply_masks, prune_and_grow
from fedmef_core.wire import Record


def adjust_step(local_epochs: int, total_steps: int) -> int:
    """The number of local steps after which a client adjusts its mask (see the module doc)."""
    if local_epochs >= 2:
        return local_epochs // 2 * (total_steps // local_epochs)
    return max(1, total_steps // 2)


@dataclass
class ClientMask(Record):
    """A client's upload on an adjustment round: the mask it trained on at the end (bitmap)."""

    mask: Masks


@dataclass
class UnionSums:
    """An adjustment round's sums, per coordinate: the sample-weighted sum of the clients' weights where their
    mask holds it (`num`), and the samples whose mask holds it (`votes`, exact integers in float64)."""

    num: dict[str, torch.Tensor]
    votes: dict[str, torch.Tensor]


class FedDSTRound(MaskedRound):
    """A client's round: on adjustment rounds it prunes and grows its own mask part-way through."""

    def step_end(self, steps_done: int, total_steps: int, batches: BatchSource) -> None:
        if self.payload.adjust and steps_done == adjust_step(self.config.federation.local_epochs, total_steps):
            self.masks = self.adjust(batches())

    def adjust(self, batches: Batches) -> Masks:
        """Prune the k_l smallest active weights, grow the k_l best-scored inactive ones (at 0); the
        masking hooks and the NSConv layers use the returned mask from the next step on."""
        grads = batch_gradients(self.model, batches)
        new_masks = {}
        for name, mask in self.masks.items():
            new, _, _ = prune_and_grow(self.weights[name], mask, grads[name].abs(), int(self.payload.k[name]))
            new_masks[name] = new.to(mask.device)
        grow_at_channel_mean(self.model, self.masks, new_masks)
        attach_masks(self.model, new_masks)
        return new_masks

    def upload(self, batches: Batches) -> ClientMask | None:
        if not self.payload.adjust:
            return None
        return ClientMask(mask={k: m.cpu() for k, m in self.masks.items()})


class FedDST(MaskedAlgorithm):
    name = "feddst"
    client_round_type = FedDSTRound
    adjusts = True
    prunes_average = False  # the union of the client masks, pruned back, replaces the mask (see the module doc)

    def adjust_sums(self, rnd: int, model: nn.Module, state: ServerState) -> UnionSums:
        zeros = {k: torch.zeros(m.shape, dtype=torch.float64) for k, m in state.masks.items()}
        return UnionSums(num=zeros, votes={k: z.clone() for k, z in zeros.items()})

    def fold_adjust(self, sums: MaskedSums, result: ClientResult) -> None:
        union: UnionSums = sums.adjustment
        upload: ClientMask = result.upload
        for name, num in union.num.items():
            m = upload.mask[name]
            num += result.state[name].double() * m * result.num_samples
            union.votes[name] += m.double() * result.num_samples

    def adjust_from_sums(self, rnd: int, model: nn.Module, sums: MaskedSums, state: ServerState) -> dict[str, float]:
        """Union, coordinate-wise average and prune-back: the masked layers' new weights replace the average."""
        union: UnionSums = sums.adjustment
        old = state.masks
        weights = prunable_weights(model)
        new_masks, pruned, grown = {}, 0, 0
        for name, mask in old.items():
            num, votes = union.num[name], union.votes[name]
            value = torch.where(votes > 0, num / votes.clamp_min(1), torch.zeros_like(num))
            union_mask = (votes > 0).flatten()
            cand = union_mask.nonzero().flatten()
            keep_n = int(mask.sum())
            # rank by |value| then votes, lower index first: two stable sorts (secondary key first)
            order = torch.sort(votes.flatten()[cand], descending=True, stable=True).indices
            cand = cand[order]
            order = torch.sort(value.abs().flatten()[cand], descending=True, stable=True).indices
            keep = cand[order[:keep_n]]
            new = torch.zeros(mask.numel(), dtype=torch.bool)
            new[keep] = True
            new = new.view(mask.shape)
            with torch.no_grad():
                weights[name].copy_((value * new).to(weights[name].dtype))
            new_masks[name] = new
            pruned += int((mask & ~new).sum())
            grown += int((new & ~mask).sum())
        state.masks = new_masks
        apply_masks(weights, new_masks)
        return {"pruned": float(pruned), "grown": float(grown)}
