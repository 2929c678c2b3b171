"""Memory accountant: what one client training step of a model really holds (METHOD.md section 5).

Parts, in bytes:

- weights: parameters and buffers as stored. A prunable weight (Conv2d/Linear ``weight``) with a mask
  (or a ``density``) is stored sparse: ``nnz`` values plus its position cost (int32 indices: 4 bytes per
  kept weight; bitmap: 1 bit per weight). Everything else is dense.
- gradients: the ``.grad`` tensors backward actually produced (measured; dense in PyTorch).
- optimizer: SGD state. No momentum: 0; momentum: one buffer per parameter (dense).
- activations: every tensor autograd saves for backward, MEASURED with
  ``torch.autograd.graph.saved_tensors_hooks``; each storage counted once (by its data pointer), the
  model's own parameters, buffers and masks excluded (they are the weights). Attributed to the
  innermost module whose forward is running (``"(loss)"``/``"(model)"`` outside any leaf module).
- peak: ``torch.cuda.max_memory_allocated`` of the step on CUDA, None elsewhere.

footprint = weights + activations (the paper's measure); total = weights + gradients + optimizer +
activations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core.models import prunable_weights

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MemoryReport:
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    peak_bytes: int | None = None
    activation_by_layer: dict[str, int] = field(default_factory=dict)
    weights_dense_bytes: int = 0
    batch_size: int = 0

    @property
    def footprint_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def parts(self) -> dict[str, int]:
        """The four additive parts, in order (for stacked bars)."""
        return {
            "weights": self.weights_bytes,
            "gradients": self.gradient_bytes,
            "optimizer": self.optimizer_bytes,
            "activations": self.activation_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["footprint_bytes"] = self.footprint_bytes
        d["total_bytes"] = self.total_bytes
        return d

    def metrics(self, prefix: str = "memory/") -> dict[str, float]:
        """Flat scalar metrics (MiB), e.g. for MLflow."""
        mib = 1024.0 * 1024.0
        out = {f"{prefix}{k}_mib": v / mib for k, v in self.parts().items()}
        out[f"{prefix}footprint_mib"] = self.footprint_bytes / mib
        out[f"{prefix}total_mib"] = self.total_bytes / mib
        if self.peak_bytes is not None:
            out[f"{prefix}peak_mib"] = self.peak_bytes / mib
        return out


def weight_bytes(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    density: float | None = None,
    positions: Literal["index", "bitmap"] = "index",
) -> int:
    """Bytes of the parameters and buffers as stored (see module doc). ``masks`` wins over ``density``."""
    prunable = prunable_weights(model)
    total = 0
    for name, p in model.named_parameters():
        mask = (masks or {}).get(name)
        if name in prunable and (mask is not None or (density is not None and density < 1.0)):
            nnz = int(mask.count_nonzero()) if mask is not None else int(round(density * p.numel()))
            pos = 4 * nnz if positions == "index" else math.ceil(p.numel() / 8)
            total += nnz * p.element_size() + pos
        else:
            total += p.numel() * p.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def model_storages(model: nn.Module) -> set[int]:
    ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():
        mask = getattr(m, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            ptrs.add(mask.untyped_storage().data_ptr())
    return ptrs


class ActivationCounter:
    """saved_tensors_hooks that count each saved storage once, per running leaf module."""

    def __init__(self, model: nn.Module):
        self.exclude = model_storages(model)
        self.seen: set[int] = set()
        self.by_layer: dict[str, int] = {}
        self.stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            if next(module.children(), None) is None:  # leaf
                self.handles.append(module.register_forward_pre_hook(self._push(name)))
                self.handles.append(module.register_forward_hook(self._pop))
        self.where = "(model)"

    def _push(self, name: str):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _pop(self, module, args, output):
        self.stack.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen and storage.nbytes() > 0:
            self.seen.add(ptr)
            layer = self.stack[-1] if self.stack else self.where
            self.by_layer[layer] = self.by_layer.get(layer, 0) + storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn = F.cross_entropy,
    momentum: float = 0.0,
    masks: Mapping[str, torch.Tensor] | None = None,
    density: float | None = None,
    weight_positions: Literal["index", "bitmap"] = "index",
) -> MemoryReport:
    """Account one training step (forward + backward) of ``model`` on the batch ``(x, y)``.

    Runs on a deep copy in train mode, so the model (its BatchNorm statistics, its grads) is untouched.
    """
    work = copy.deepcopy(model).train()
    for p in work.parameters():
        p.grad = None
    counter = ActivationCounter(work)
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out = work(x)
            counter.where = "(loss)"
            loss = loss_fn(out, y)
        loss.backward()
    finally:
        counter.close()
    peak = None
    if cuda:
        torch.cuda.synchronize(x.device)
        peak = int(torch.cuda.max_memory_allocated(x.device))
    grads = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
             for p in work.parameters() if p.grad is not None}
    dense_params = sum(p.numel() * p.element_size() for p in work.parameters())
    return MemoryReport(
        weights_bytes=weight_bytes(work, masks, density, weight_positions),
        gradient_bytes=sum(grads.values()),
        optimizer_bytes=dense_params if momentum > 0 else 0,
        activation_bytes=sum(counter.by_layer.values()),
        peak_bytes=peak,
        activation_by_layer=counter.by_layer,
        weights_dense_bytes=dense_params + sum(b.numel() * b.element_size() for b in work.buffers()),
        batch_size=int(x.shape[0]),
    )
