"""PNG plots, drawn with matplotlib's Agg canvas (no pyplot, no global state: safe in threads and servers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmef_core.io import atomic_path


def save_png(fig: Figure, path: str | Path) -> None:
    """Write `fig` as a PNG atomically, without matplotlib's version in its metadata (the `Software` text it adds
    by default): the same figure is the same file whatever matplotlib drew it, as long as its pixels are."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})


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
    save_png(fig, path)


def plot_round_curves(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Test accuracy and loss per round (rounds without evaluation are skipped)."""
    rows = [h for h in history if "accuracy" in h]
    rounds = [h["round"] for h in rows]
    fig = Figure(figsize=(8, 3.4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    ax_acc.plot(rounds, [h["accuracy"] for h in rows], marker=".", color="tab:blue")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="accuracy")
    ax_loss.plot(rounds, [h["loss"] for h in rows], marker=".", color="tab:red", label="test")
    trained = [h for h in history if "train_loss" in h]  # a round in which no client trained has none
    ax_loss.plot([h["round"] for h in trained], [h["train_loss"] for h in trained], color="tab:gray",
                 alpha=0.7, label="train (clients)")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    save_png(fig, path)


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
    save_png(fig, path)


MEMORY_PART_COLORS = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer": "tab:green",
                      "activations": "tab:red"}


def plot_memory_parts(panels: dict[str, dict[str, dict[str, int]]], path: str | Path, title: str = "") -> None:
    """Stacked bars of training-step memory by part, in MiB: ``{panel: {bar label: {part: bytes}}}``.

    Parts (weights, gradients, optimizer, activations) stack bottom to top; one subplot per panel.
    """
    fig = Figure(figsize=(max(4.0, 2.2 + 1.3 * max(len(b) for b in panels.values())) * len(panels) / 1.3, 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, bars) in zip(axes, panels.items()):
        labels = list(bars)
        bottom = np.zeros(len(labels))
        for part, color in MEMORY_PART_COLORS.items():
            mib = np.array([bars[label].get(part, 0) / 2**20 for label in labels])
            ax.bar(range(len(labels)), mib, bottom=bottom, color=color, label=part)
            bottom += mib
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="MiB", title=name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_png(fig, path)


def plot_layer_density(densities: dict[str, float], path: str | Path, title: str = "") -> None:
    """Bar chart of the density of every prunable layer (global density as a dashed line)."""
    names = list(densities)
    fig = Figure(figsize=(max(5.0, 0.35 * len(names) + 2), 3.6))
    ax = fig.subplots()
    ax.bar(range(len(names)), [densities[n] for n in names], color="tab:green")
    ax.set_xticks(range(len(names)), labels=[n.removesuffix(".weight") for n in names], rotation=60,
                  ha="right", fontsize=8)
    ax.set(ylabel="density (kept fraction)", ylim=(0, 1.05), title=title or "per-layer density")
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)


def plot_accuracy_with_adjustments(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Test accuracy per round; rounds whose mask was adjusted are marked by dotted vertical lines."""
    rows = [h for h in history if "accuracy" in h]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot([h["round"] for h in rows], [h["accuracy"] for h in rows], marker=".", color="tab:blue")
    for i, h in enumerate(h for h in history if h.get("adjusted")):
        ax.axvline(h["round"], color="tab:orange", linestyle=":", label="mask adjustment" if i == 0 else None)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=title or "accuracy")
    ax.grid(alpha=0.3)
    if any(h.get("adjusted") for h in history):
        ax.legend(loc="lower right")
    save_png(fig, path)


def plot_participation(rows: Sequence[dict], tiers: Sequence[str], path: str | Path, title: str = "") -> None:
    """Per tier (one panel each, smallest budget first): per round, its sampled clients that trained, were
    excluded by their budget, went over it while training or were dropped for another fault (stacked bars)."""
    rounds = sorted({int(r["round"]) for r in rows})
    statuses = (("trained", "tab:green"), ("excluded", "tab:grey"), ("over_budget", "tab:red"),
                ("dropped", "tab:orange"))
    fig = Figure(figsize=(min(max(6.0, 0.25 * len(rounds) + 3), 16.0), 1.8 * len(tiers) + 0.8))
    axes = fig.subplots(len(tiers), 1, sharex=True, squeeze=False)[:, 0]
    for ax, tier in zip(axes, tiers):
        bottom = np.zeros(len(rounds))
        for status, colour in statuses:
            counts = np.array([sum(1 for r in rows if r["tier"] == tier and int(r["round"]) == rnd
                                   and r["status"] == status) for rnd in rounds], dtype=float)
            ax.bar(rounds, counts, bottom=bottom, color=colour, label=status.replace("_", " "))
            bottom += counts
        trained = sum(1 for r in rows if r["tier"] == tier and r["status"] == "trained")
        sampled = sum(1 for r in rows if r["tier"] == tier)
        ax.set_ylabel("clients")
        ax.set_title(f"{tier}: {trained} of {sampled} sampled trained", fontsize=9, loc="left")
        ax.yaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    axes[-1].set_xlabel("round")
    if title:
        fig.suptitle(title, y=1.06)
    save_png(fig, path)
