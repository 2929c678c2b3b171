"""Mask adjustment: the cosine schedule, prune (k smallest active) and grow (top-k inactive)."""

from __future__ import annotations

import math

import torch


def cosine_alpha(alpha: float, rnd: int, until: int) -> float:
    """alpha_t = alpha/2 * (1 + cos(pi * t / R_end))."""
    if until <= 0:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * min(rnd, until) / until))


def is_adjust_round(rnd: int, interval: int, until: int) -> bool:
    """Every `interval` rounds while `rnd <= until`."""
    return rnd % interval == 0 and rnd <= until


def move_count(alpha_t: float, active: int, numel: int | None = None) -> int:
    """k_l = round(alpha_t * active_l), never all of the layer's active weights and never more than
    its inactive ones (a dense layer moves nothing)."""
    k = min(active - 1, round(alpha_t * active))
    if numel is not None:
        k = min(k, numel - active)
    return max(0, k)


def _top_positions(scores: torch.Tensor, candidates: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat indices of the `k` best `scores` among `candidates` (bool, flat). Ties: lower index first."""
    idx = candidates.nonzero().flatten()
    if k > idx.numel():
        raise ValueError(f"asked for {k} positions but only {idx.numel()} candidates")
    vals = scores.flatten()[idx].double()
    order = torch.sort(vals, descending=largest, stable=True).indices  # idx ascending -> stable ties
    return idx[order[:k]]


def smallest_active(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the `k` active weights of smallest magnitude (what `prune` removes)."""
    return _top_positions(weight.detach().abs().cpu(), mask.flatten().cpu(), k, largest=False)


def prune(weight: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove exactly the `k` smallest-magnitude active weights. Returns (new mask, pruned flat indices)."""
    idx = smallest_active(weight, mask, k)
    new = mask.clone().flatten()
    new[idx] = False
    return new.view(mask.shape), idx


def grow(scores: torch.Tensor, mask: torch.Tensor, k: int,
         eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activate exactly the `k` inactive positions with the largest `scores` (e.g. |gradient|).

    `eligible` (bool, default: everything inactive in `mask`) restricts the candidates, e.g. to
    exclude positions pruned a moment ago. Returns (new mask, grown flat indices).
    """
    cand = ~mask.flatten().cpu()
    if eligible is not None:
        cand &= eligible.flatten().cpu()
    idx = _top_positions(scores.detach().cpu(), cand, k, largest=True)
    new = mask.clone().flatten()
    new[idx] = True
    return new.view(mask.shape), idx


def prune_and_grow(weight: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, int, int]:
    """Prune the k smallest active, grow the k best-scored among the weights inactive *before* the
    prune; the number of active weights is unchanged. Sets new weights to 0 and pruned ones to 0
    (in place on `weight`). Returns (new mask, pruned, grown)."""
    old = mask.flatten().cpu()
    pruned_mask, _ = prune(weight, mask, k)
    new, _ = grow(scores, pruned_mask, k, eligible=~old)
    with torch.no_grad():
        weight.mul_(new.to(device=weight.device, dtype=weight.dtype))
    return new, k, k
