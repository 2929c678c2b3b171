"""Sparsity masks over the prunable weights: per-layer densities (ERK, uniform), random masks, helpers.

A mask set is a ``dict[str, torch.BoolTensor]`` keyed by parameter name (the keys of
:func:`fedmef_core.models.prunable_weights`), each tensor the shape of its weight; ``True`` = active.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities: ``d_l ∝ sum(dims_l) / prod(dims_l)``, scaled so that the
    global density over all weights is ``density`` (see :func:`fit_densities`).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return fit_densities(shapes, {k: sum(s) / math.prod(s) for k, s in shapes.items()}, density)


def fit_densities(shapes: Mapping[str, tuple[int, ...]], raw: Mapping[str, float],
                  density: float) -> dict[str, float]:
    """Per-layer densities proportional to ``raw``, scaled so that the global density is ``density``.
    A layer whose density would exceed 1 is kept dense and the remaining budget is redistributed over
    the other layers."""
    numels = {k: math.prod(s) for k, s in shapes.items()}
    target = density * sum(numels.values())
    dense: set[str] = set()
    while True:
        budget = target - sum(numels[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        if not free:
            break
        scale = budget / sum(raw[k] * numels[k] for k in free)
        over = [k for k in free if raw[k] * scale > 1]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else raw[k] * scale for k in shapes}


def uniform_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """The same density in every layer."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return dict.fromkeys(shapes, density)


def active_counts(shapes: Mapping[str, tuple[int, ...]], density: float, distribution: str) -> dict[str, int]:
    """Active weights per layer, rounded so that the total is exactly ``round(density * total)``
    (largest-remainder rounding; every layer keeps at least one weight)."""
    fn = {"erk": erk_densities, "uniform": uniform_densities}.get(distribution)
    if fn is None:
        raise ValueError(f"unknown density distribution {distribution!r}; use 'erk' or 'uniform'")
    return round_counts(shapes, fn(shapes, density), density)


def round_counts(shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float],
                 density: float) -> dict[str, int]:
    """Per-layer ``densities`` as whole counts totalling exactly ``round(density * total)``."""
    numels = {k: math.prod(s) for k, s in shapes.items()}
    exact = {k: densities[k] * numels[k] for k in shapes}
    counts = {k: max(1, min(numels[k], math.floor(v))) for k, v in exact.items()}
    want = max(len(shapes), round(density * sum(numels.values())))
    order = sorted(shapes, key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    i = 0
    while sum(counts.values()) != want and i < 4 * len(order) + 4:
        k = order[i % len(order)]
        if sum(counts.values()) < want and counts[k] < numels[k]:
            counts[k] += 1
        elif sum(counts.values()) > want and counts[k] > 1:
            counts[k] -= 1
        i += 1
    return counts


def perturbed_counts(shapes: Mapping[str, tuple[int, ...]], density: float, distribution: str,
                     generator: torch.Generator, spread: float = 2.0) -> dict[str, int]:
    """Layer counts around ``distribution``'s: each layer's density times a log-uniform factor in
    [1/spread, spread], rescaled so the global density is still exactly ``density`` (a layer that
    would exceed 1 is kept dense and its excess spread over the others)."""
    base = active_counts(shapes, density, distribution)
    factors = torch.exp((torch.rand(len(shapes), generator=generator, dtype=torch.float64) * 2 - 1)
                        * math.log(spread))
    raw = {k: base[k] * float(f) / math.prod(shapes[k]) for k, f in zip(shapes, factors)}
    return round_counts(shapes, fit_densities(shapes, raw, density), density)


def random_masks(shapes: Mapping[str, tuple[int, ...]], counts: Mapping[str, int],
                 generator: torch.Generator) -> Masks:
    """Uniformly random masks with exactly ``counts[name]`` active entries per layer."""
    masks: Masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[: counts[name]]] = True
        masks[name] = flat.view(shape)
    return masks


def shapes_of(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


@torch.no_grad()
def apply_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask (in place)."""
    for name, mask in masks.items():
        w = weights[name]
        w.mul_(mask.to(device=w.device, dtype=w.dtype))


def mask_gradients(weights: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradient of every weight outside its mask (in place)."""
    for name, mask in masks.items():
        g = weights[name].grad
        if g is not None:
            g.mul_(mask.to(device=g.device, dtype=g.dtype))


def layer_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: m.sum().item() / m.numel() for k, m in masks.items()}


def global_density(masks: Mapping[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def density_metrics(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``density`` and ``density/<layer>`` (MLflow-safe names: letters, digits, ``.``, ``_``, ``/``)."""
    out = {"density": global_density(masks)}
    out.update({f"density/{k}": v for k, v in layer_densities(masks).items()})
    return out
