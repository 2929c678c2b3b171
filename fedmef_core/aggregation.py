"""Server aggregation: sample-weighted averaging of client states (FedAvg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Average each entry of `states`, weighted by `weights` (e.g. client sample counts).

    Floating tensors are accumulated in float64 and cast back, so the result is the exact weighted
    mean up to the final rounding. Integer buffers (e.g. BatchNorm's batch counter) take the maximum.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights must sum to a positive number")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, w in zip(states, weights):
                acc.add_(state[key].to(torch.float64), alpha=float(w) / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).amax(dim=0)
    return out
