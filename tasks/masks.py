"""Mask tracking for the sparse methods: mask files at every adjustment round, density and accuracy plots.

The masks are also in `server_state` of every checkpoint; these files make each adjustment easy to
inspect (and to compare across rounds) without loading a whole checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmef_core.checkpoint import save_checkpoint
from fedmef_core.models import prunable_weights
from fedmef_core.plots import plot_accuracy_with_adjustments, plot_layer_density
from fedmef_core.sparse import layer_densities


def mask_path(checkpoints_dir: str | Path, rnd: int) -> Path:
    return Path(checkpoints_dir) / f"masks_round_{rnd:04d}.pt"


def save_adjusted_masks(server: Any, rnd: int, metrics: dict[str, float], checkpoints_dir: str | Path,
                        tracker: Any = None) -> Path | None:
    """After an adjustment round, write `masks_round_XXXX.pt` and log it to MLflow under `masks/`."""
    masks = server.state.masks  # only the sparse methods keep masks
    if masks is None or not metrics.get("adjusted"):
        return None
    path = save_checkpoint(mask_path(checkpoints_dir, rnd), {"round": rnd, "masks": masks})
    if tracker is not None:
        tracker.log_artifact(path, "masks")
    return path


def write_mask_plots(server: Any, plots_dir: str | Path, tracker: Any = None, title: str = "") -> list[Path]:
    """`density.png` (per-layer density of the final mask) and `accuracy_adjustments.png`; a dense
    model's density plot is all ones (every method writes both: they are stage outputs)."""
    masks = server.state.masks  # only the sparse methods keep masks
    densities = layer_densities(masks) if masks is not None else dict.fromkeys(prunable_weights(server.model), 1.0)
    plots_dir = Path(plots_dir)
    paths = [plots_dir / "density.png", plots_dir / "accuracy_adjustments.png"]
    plot_layer_density(densities, paths[0], title=f"{title} per-layer density".strip())
    plot_accuracy_with_adjustments(server.history, paths[1], title=title)
    if tracker is not None:
        for p in paths:
            tracker.log_artifact(p, "plots")
    return paths
