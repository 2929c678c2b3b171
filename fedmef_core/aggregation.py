"""Server aggregation: sample-weighted averaging of client states (FedAvg), one state at a time.

`WeightedSum` folds each client state into float64 running sums as it arrives (``sum_k n_k * state_k``)
and divides by the weights that really arrived at the end, so the server holds the running sums and one
client state, never all K of them, and needs to know neither how many clients will answer nor their
sample counts up front (a client dropped half-way through a round changes nothing else). Folded in the
same order, the streamed result is bit-identical to averaging the list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class WeightedSum:
    """The weighted mean of states added one by one.

    Floating tensors are accumulated in float64 (``acc += state * weight``, in the order of :meth:`add`),
    divided by the sum of the weights and cast back by :meth:`result`, so it is the exact weighted mean up
    to the final rounding. Integer buffers (e.g. BatchNorm's batch counter) take the maximum.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if float(weight) <= 0:
            raise ValueError(f"a state's weight must be positive, not {weight}")
        if not self._sums:
            self._start(state)
        self.total += float(weight)
        for key, acc in self._sums.items():
            if self._dtypes[key].is_floating_point:
                acc.add_(state[key].to(torch.float64), alpha=float(weight))
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
        return {key: (acc / self.total if self._dtypes[key].is_floating_point else acc).to(self._dtypes[key])
                for key, acc in self._sums.items()}


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Average each entry of `states`, weighted by `weights` (e.g. client sample counts): a
    :class:`WeightedSum` over a list."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    acc = WeightedSum()
    for state, w in zip(states, weights):
        acc.add(state, w)
    return acc.result()
