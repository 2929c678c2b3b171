"""Sparse training building blocks: masks, densities, prune/grow, communication cost."""

from fedmef_core.sparse.adjust import (
    cosine_alpha,
    grow,
    is_adjust_round,
    move_count,
    prune,
    prune_and_grow,
    smallest_active,
)
from fedmef_core.sparse.comm import INDEX_BYTES, VALUE_BYTES, mask_bytes, sparse_bytes, state_bytes, topk_bytes
from fedmef_core.sparse.masks import (
    Masks,
    active_counts,
    apply_masks,
    density_metrics,
    erk_densities,
    global_density,
    layer_densities,
    mask_gradients,
    perturbed_counts,
    random_masks,
    shapes_of,
    uniform_densities,
)

__all__ = [
    "INDEX_BYTES", "VALUE_BYTES", "Masks", "active_counts", "apply_masks", "cosine_alpha", "density_metrics",
    "erk_densities",
    "global_density", "grow", "is_adjust_round", "layer_densities", "mask_bytes", "mask_gradients",
    "move_count", "perturbed_counts", "prune", "prune_and_grow", "random_masks", "shapes_of", "smallest_active",
    "sparse_bytes", "state_bytes", "topk_bytes", "uniform_densities",
]
