"""FedTiny (Huang et al., ICDCS 2023): server-side prune-and-grow from uploaded top-k gradients.

On an adjustment round each client, after local training, computes the gradient of one mini-batch
and uploads, per layer, the k_l largest-magnitude gradients of *inactive* weights (values + int32
indices: :class:`TopGradients`). The server averages the weights (FedAvg), sums the uploaded gradients
weighted by client sample counts (:class:`GradientScores`), prunes the k_l smallest-magnitude active weights
and grows the k_l inactive positions with the largest summed gradient magnitude (new weights = 0).

With ``pruning.bn_select`` the initial mask is chosen by FedTiny's adaptive BatchNorm selection:
the server draws ``bn_candidates`` random masks (the first with the configured ERK/uniform layer
densities, the others with each layer's density scaled by a random factor in [1/2, 2], the global
density unchanged). Before round 1 the sampled clients, for every candidate, re-estimate the BatchNorm
statistics of the masked initial model on their data, then report its loss on that data with those
statistics, and upload loss and statistics (:class:`CandidateScores`). The server keeps the candidate with
the lowest sample-weighted loss and starts from it, with its BatchNorm statistics averaged over the clients.
FedTiny builds its pool by pruning the initial model with varied layer-wise ratios; here the positions
are drawn at random, which is what a magnitude ranking of freshly initialised weights amounts to. The
setup exchange's bytes are not counted in the communication metrics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core.aggregation import weighted_average
from fedmef_core.algorithms.base import Batches, BatchSource, ClientResult
from fedmef_core.algorithms.records import ServerState
from fedmef_core.algorithms.static import MaskedAlgorithm, MaskedRound, MaskedSums, batch_gradients
from fedmef_core.models import prunable_weights
from fedmef_core.models.nsconv import grow_at_channel_mean
from fedmef_core.sparse import Masks, apply_masks, perturbed_counts, prune_and_grow, random_masks, shapes_of
from fedmef_core.wire import Record


@dataclass
class TopGradients(Record):
    """A client's upload on an adjustment round: per layer, its k_l largest gradients of inactive weights."""

    grad_idx: dict[str, torch.Tensor]  # flat positions, int32
    grad_val: dict[str, torch.Tensor]  # their gradients, float32


@dataclass
class GradientScores:
    """An adjustment round's sums: per layer, every position's sample-weighted summed uploaded gradient."""

    scores: dict[str, torch.Tensor]  # flat, float64


@dataclass
class Candidates(Record):
    """The setup exchange's broadcast: the initial-mask candidates."""

    candidates: list[Masks]


@dataclass
class CandidateScores(Record):
    """A client's setup answer: each candidate's loss on its data, with the BatchNorm statistics it re-estimated."""

    loss: torch.Tensor  # float64, one per candidate
    buffers: list[dict[str, torch.Tensor]]  # one state of buffers per candidate


class FedTinyRound(MaskedRound):
    """A client's round: on adjustment rounds it uploads its top-k gradients of inactive weights."""

    def upload(self, batches: Batches) -> TopGradients | None:
        if not self.payload.adjust:
            return None
        grads = batch_gradients(self.model, batches)
        idx_out, val_out = {}, {}
        for name, g in grads.items():
            k = int(self.payload.k[name])
            inactive = ~self.payload.masks[name].flatten()
            cand = inactive.nonzero().flatten()
            vals = g.flatten()[cand]
            top = torch.sort(vals.abs(), descending=True, stable=True).indices[:k]
            idx_out[name] = cand[top].to(torch.int32)
            val_out[name] = vals[top].to(torch.float32)
        return TopGradients(grad_idx=idx_out, grad_val=val_out)


class FedTiny(MaskedAlgorithm):
    name = "fedtiny"
    client_round_type = FedTinyRound
    adjusts = True

    # ---- adaptive BN selection of the initial mask (pruning.bn_select) -------------------------
    def init_server_state(self, model: nn.Module, generator: torch.Generator) -> ServerState:
        p = self.config.pruning
        if not p.bn_select:
            return super().init_server_state(model, generator)
        first = self.initial_masks(model, generator)  # the mask used without selection; weights stay dense
        shapes = shapes_of(prunable_weights(model))
        others = [random_masks(shapes, perturbed_counts(shapes, p.density, p.distribution, generator), generator)
                  for _ in range(p.bn_candidates - 1)]
        return self.state_type(masks=first, candidates=[first, *others])

    def setup_payload(self, model: nn.Module, state: ServerState) -> Candidates | None:
        return None if state.candidates is None else Candidates(candidates=state.candidates)

    def client_setup(self, model: nn.Module, payload: Candidates, batches: BatchSource) -> CandidateScores:
        losses, stats, candidates = [], [], payload.candidates
        for masks in candidates:
            candidate = copy.deepcopy(model)
            apply_masks(prunable_weights(candidate), masks)
            norms = [m for m in candidate.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for bn in norms:
                bn.reset_running_stats()
                bn.momentum = None  # a plain average over the client's batches
            with torch.no_grad():
                candidate.train()
                for x, _ in batches():
                    candidate(x)
                candidate.eval()
                total, seen = 0.0, 0
                for x, y in batches():
                    total += F.cross_entropy(candidate(x), y, reduction="sum").item()
                    seen += len(y)
            losses.append(total / max(seen, 1))
            stats.append({k: v.detach().cpu().clone() for k, v in candidate.named_buffers()})
        return CandidateScores(loss=torch.tensor(losses, dtype=torch.float64), buffers=stats)

    def finish_setup(self, model: nn.Module, results: list[ClientResult], state: ServerState) -> dict[str, float]:
        candidates, state.candidates = state.candidates, None
        n = torch.tensor([float(r.num_samples) for r in results], dtype=torch.float64)
        losses = torch.stack([r.upload.loss for r in results])  # clients x candidates
        mean = (losses * n[:, None]).sum(0) / n.sum()
        best = int(torch.argmin(mean))  # ties: the lowest index
        state.masks = candidates[best]
        apply_masks(prunable_weights(model), state.masks)
        buffers = weighted_average([r.upload.buffers[best] for r in results], n.tolist())
        model.load_state_dict({**model.state_dict(), **buffers})
        metrics = {"bn_select/chosen": float(best)}
        metrics.update({f"bn_select/loss_{i}": float(v) for i, v in enumerate(mean)})
        return metrics

    # ---- adjustment rounds ---------------------------------------------------------------------
    def adjust_sums(self, rnd: int, model: nn.Module, state: ServerState) -> GradientScores:
        return GradientScores(scores={k: torch.zeros(m.numel(), dtype=torch.float64) for k, m in state.masks.items()})

    def fold_adjust(self, sums: MaskedSums, result: ClientResult) -> None:
        upload: TopGradients = result.upload
        for name, scores in sums.adjustment.scores.items():
            idx, val = upload.grad_idx[name], upload.grad_val[name]
            scores.index_add_(0, idx.long(), val.double() * result.num_samples)

    def adjust_from_sums(self, rnd: int, model: nn.Module, sums: MaskedSums, state: ServerState) -> dict[str, float]:
        masks = state.masks
        counts = self.move_counts(rnd, masks)
        weights = prunable_weights(model)
        new_masks, pruned, grown = {}, 0, 0
        for name, mask in masks.items():
            scores = sums.adjustment.scores[name]
            new, p, g = prune_and_grow(weights[name], mask, scores.abs().view(mask.shape), counts[name])
            new_masks[name], pruned, grown = new, pruned + p, grown + g
        grow_at_channel_mean(model, masks, new_masks)
        state.masks = new_masks
        return {"pruned": float(pruned), "grown": float(grown)}
