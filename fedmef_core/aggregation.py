"""Server aggregation: sample-weighted averaging of client states (FedAvg), one state at a time.

`WeightedSum` folds each client state into float64 running sums as it arrives, so the server holds
the running sums and one client state, never all K of them. The weights' total is fixed up front
(the server knows each answering client's sample count before it reads any state), which makes the
streamed result bit-identical to averaging the list in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


class WeightedSum:
    """The weighted mean of states added one by one; `total` is the sum of all the weights to come.

    Floating tensors are accumulated in float64 (``acc += state * (weight / total)``, in the order of
    :meth:`add`) and cast back by :meth:`result`, so it is the exact weighted mean up to the final
    rounding. Integer buffers (e.g. BatchNorm's batch counter) take the maximum.
    """

    def __init__(self, total: float):
        self.total = float(total)
        if self.total <= 0:
            raise ValueError("the weights must sum to a positive number")
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._added = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if not self._sums:
            self._start(state)
        share = float(weight) / self.total
        self._added += float(weight)
        for key, acc in self._sums.items():
            if self._dtypes[key].is_floating_point:
                acc.add_(state[key].to(torch.float64), alpha=share)
            else:
                torch.maximum(acc, state[key], out=acc)

    def _start(self, first: Mapping[str, torch.Tensor]) -> None:
        for key, value in first.items():
            self._dtypes[key] = value.dtype
            floating = value.is_floating_point()
            self._sums[key] = torch.zeros_like(value, dtype=torch.float64) if floating else value.clone()

    def result(self) -> dict[str, torch.Tensor]:
        if not self._sums:
            raise ValueError("weighted_average needs at least one state")
        if not math.isclose(self._added, self.total, rel_tol=1e-9):
            raise ValueError(f"the weights added sum to {self._added}, not to the announced total {self.total}")
        return {key: acc.to(self._dtypes[key]) for key, acc in self._sums.items()}


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Average each entry of `states`, weighted by `weights` (e.g. client sample counts): a
    :class:`WeightedSum` over a list."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    acc = WeightedSum(sum(weights))
    for state, w in zip(states, weights):
        acc.add(state, w)
    return acc.result()
