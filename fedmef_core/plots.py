"""PNG plots, drawn with matplotlib's Agg canvas (no pyplot, no global state: safe in threads and servers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmef_core.io import atomic_path


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_partition_heatmap(
    histogram: Sequence[Sequence[int]] | np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
) -> None:
    """Heat map of samples per (client, class): clients on x, classes on y, colour = count."""
    counts = np.asarray(histogram, dtype=np.int64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"histogram must be clients x classes, got shape {counts.shape}")
    num_clients, num_classes = counts.shape
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    fig = Figure(
        figsize=(min(max(6.0, 0.2 * num_clients + 2), 20.0), min(max(3.0, 0.3 * num_classes + 1), 14.0))
    )
    ax = fig.add_subplot()
    image = ax.imshow(counts.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    ax.set_title(f"Label distribution over {num_clients} clients ({counts.sum()} samples)")
    if num_clients <= 50:
        ax.set_xticks(range(num_clients))
        ax.tick_params(axis="x", labelsize=7 if num_clients > 20 else 9)
    if num_classes <= 50:
        ax.set_yticks(range(num_classes), labels=[str(c) for c in (class_names or range(num_classes))])
    _save(fig, path)


def plot_round_curves(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Test accuracy and loss per round (rounds without evaluation are skipped)."""
    rows = [h for h in history if "accuracy" in h]
    rounds = [h["round"] for h in rows]
    fig = Figure(figsize=(8, 3.4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    ax_acc.plot(rounds, [h["accuracy"] for h in rows], marker=".", color="tab:blue")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="accuracy")
    ax_loss.plot(rounds, [h["loss"] for h in rows], marker=".", color="tab:red", label="test")
    ax_loss.plot([h["round"] for h in history], [h["train_loss"] for h in history], color="tab:gray",
                 alpha=0.7, label="train (clients)")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                   title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class), with counts in the cells."""
    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k))
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    _save(fig, path)
