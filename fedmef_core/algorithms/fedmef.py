"""FedMef: FedTiny-style adjustment + budget-aware extrusion (BaE).

On an adjustment round the server marks theta_low: per layer the k_l smallest-magnitude active
weights of the global model (exactly those the coming prune would remove) and broadcasts their
indices. During that round's local training clients add
``lambda * sum_l ||theta_low,l||_2`` (or its square) to the loss and use the budget-aware lr

    beta_t = p(t) * (2 sigmoid(||theta_low||_1) - 1) * eta_0,   p(t) = (2T - 2t) / (2T - t)
    lr_t   = min(xi, max(eta_t, psi * beta_t))

(T = local steps of the round, eta_0 = `federation.lr`, eta_t the round's scheduled lr). Upload,
prune and grow are FedTiny's. Scaled activation pruning lives in the SAP modules, not here.

Instrumentation (round metrics of adjustment rounds): ``bae/low_norm_start`` and ``bae/low_norm_end``,
sum_l ||theta_low,l||_2 at the start and the end of local training (two floats per client, not counted
as communication; the sample-weighted mean over clients), and ``bae/low_norm_global``, the same norm in
the averaged global model right before the prune.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedmef_core.algorithms.base import Batches, ClientResult
from fedmef_core.algorithms.fedtiny import FedTiny
from fedmef_core.models import prunable_weights
from fedmef_core.sparse import INDEX_BYTES, smallest_active


def budget_profile(step: int, total: int) -> float:
    """p(t) = (2T - 2t) / (2T - t): 1 at the first step, 0 at the end of the budget."""
    t, T = min(step, total), max(total, 1)
    return (2 * T - 2 * t) / (2 * T - t)


class FedMef(FedTiny):
    name = "fedmef"

    def adjust_payload(self, rnd: int, model: nn.Module, state: dict[str, Any],
                       counts: dict[str, int]) -> dict[str, Any]:
        weights = prunable_weights(model)
        low = {k: smallest_active(weights[k], m, counts[k]) for k, m in state["masks"].items()}
        state["marked"] = low  # for bae/low_norm_global; taken out again by adjust
        return {"low": low}

    def adjust_sums(self, rnd: int, state: dict[str, Any]) -> dict[str, Any]:
        return {**super().adjust_sums(rnd, state), "low_norm_start": [], "low_norm_end": []}

    def fold_adjust(self, sums: dict[str, Any], result: ClientResult) -> None:
        super().fold_adjust(sums, result)
        for key in ("low_norm_start", "low_norm_end"):
            sums[key].append(result.upload[key] * result.num_samples)

    def adjust_from_sums(self, rnd: int, model: nn.Module, sums: dict[str, Any],
                         state: dict[str, Any]) -> dict[str, float]:
        weights = prunable_weights(model)
        marked = state.pop("marked")
        metrics = {f"bae/{key}": sum(sums[key]) / sums["samples"] for key in ("low_norm_start", "low_norm_end")}
        metrics["bae/low_norm_global"] = float(sum(weights[k].detach().flatten()[i].norm() for k, i in marked.items()))
        return {**metrics, **super().adjust_from_sums(rnd, model, sums, state)}

    def adjust_download_bytes(self, counts: dict[str, int]) -> int:
        return INDEX_BYTES * sum(counts.values())

    def on_client_start(self, model: nn.Module, payload: dict[str, Any]) -> None:
        super().on_client_start(model, payload)
        if "low" in payload:
            self._low_norm_start = self.measured_low_norm(payload)

    def client_upload(self, model: nn.Module, payload: dict[str, Any], batches: Batches) -> dict[str, Any]:
        upload = super().client_upload(model, payload, batches)
        if "low" in payload:
            upload.update(low_norm_start=self._low_norm_start, low_norm_end=self.measured_low_norm(payload))
        return upload

    def _low(self, payload: dict[str, Any]):
        return [(self._weights[k].flatten(), idx.to(self._weights[k].device)) for k, idx in payload["low"].items()]

    def low_norm(self, payload: dict[str, Any], p: int = 2) -> torch.Tensor:
        """sum_l ||theta_low,l||_p of the client's current weights."""
        return sum((w[i].norm(p=p) for w, i in self._low(payload)))

    @torch.no_grad()
    def measured_low_norm(self, payload: dict[str, Any]) -> float:
        return float(self.low_norm(payload))

    def extra_loss(self, model: nn.Module, payload: dict[str, Any]) -> torch.Tensor | None:
        if "low" not in payload:
            return None
        cfg = self.config.pruning
        if cfg.bae_norm == "squared_l2":
            total = sum((w[i].pow(2).sum() for w, i in self._low(payload)))
        else:
            total = self.low_norm(payload)
        return cfg.bae_lambda * total

    def step_lr(self, base_lr: float, step: int, total_steps: int, model: nn.Module,
                payload: dict[str, Any]) -> float:
        if "low" not in payload:
            return base_lr
        cfg = self.config.pruning
        with torch.no_grad():
            l1 = float(self.low_norm(payload, p=1))
        beta = budget_profile(step, total_steps) * (2 / (1 + math.exp(-l1)) - 1) * self.config.federation.lr
        lr = min(cfg.bae_xi, max(base_lr, cfg.bae_psi * beta))
        self.lr_trace = [*getattr(self, "lr_trace", []), lr]
        return lr
