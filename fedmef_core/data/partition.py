"""Split the training set among clients (iid, Dirichlet label skew, or label shards), and persist the split.

Every partition is a list of disjoint, sorted int64 index arrays whose union is every sample, and depends
only on the labels, the number of clients and `PartitionConfig` (its `seed` drives a numpy Generator).

A saved partition (`clients.json`) records what it was made from (:func:`partition_origin`); loading it
checks the indices against that record, and against the current run's when given, so an edited or stale
file is refused before any round with a message saying to re-run the partition stage.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fedmef_core.config import ExperimentConfig, PartitionConfig
from fedmef_core.errors import UserError
from fedmef_core.io import read_json, write_json


class PartitionError(UserError, ValueError):
    """The requested split is impossible or a saved partition is malformed; the message names the knob."""


class PartitionMissing(UserError, FileNotFoundError):
    """No partition was saved in the folder (the train flow makes it; see `tasks.partitioning`)."""


DIRICHLET_TRIES = 1000
SHARD_SWAPS_PER_SHARD = 20


def partition_indices(labels: np.ndarray, num_clients: int, cfg: PartitionConfig) -> list[np.ndarray]:
    """Indices of each client's samples. Raises ValueError (naming the knob to change) when impossible."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be one-dimensional, got shape {labels.shape}")
    if num_clients < 1:
        raise PartitionError(f"federation.num_clients must be >= 1, got {num_clients}")
    n = labels.shape[0]
    if num_clients * cfg.min_samples > n:
        raise PartitionError(
            f"{num_clients} clients x partition.min_samples={cfg.min_samples} needs "
            f"{num_clients * cfg.min_samples} samples but the training set has {n}: lower "
            "partition.min_samples or federation.num_clients (or raise data.train_limit)"
        )
    if cfg.seed is None:  # a PartitionConfig on its own: an ExperimentConfig fills it from its top-level seed
        raise ValueError("partition.seed is null: set it, or pass the partition of a validated ExperimentConfig")
    rng = np.random.default_rng(cfg.seed)
    if cfg.scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif cfg.scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, cfg, rng)
    elif cfg.scheme == "shards":
        parts = _shards(labels, num_clients, cfg, rng)
    else:
        raise PartitionError(f"unknown partition.scheme {cfg.scheme!r}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator):
    """Per class, client shares ~ Dirichlet(alpha); redrawn until every client has >= min_samples."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(DIRICHLET_TRIES):  # a draw is judged by its client sizes alone: ~1 ms even for 10^4 clients
        cuts = [np.round(np.cumsum(rng.dirichlet(np.full(num_clients, cfg.alpha)))[:-1] * idx.size).astype(np.int64)
                for idx in by_class]
        sizes = sum(np.diff(c, prepend=0, append=idx.size) for c, idx in zip(cuts, by_class))
        if sizes.min() >= cfg.min_samples:
            chunks = [np.split(idx, c) for c, idx in zip(cuts, by_class)]
            return [np.concatenate([per_class[client] for per_class in chunks]) for client in range(num_clients)]
    raise PartitionError(
        f"Dirichlet split with partition.alpha={cfg.alpha} left some client below partition.min_samples="
        f"{cfg.min_samples} in all {DIRICHLET_TRIES} draws: raise partition.alpha, lower "
        "partition.min_samples, or lower federation.num_clients"
    )


def _shards(labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator):
    """Sort by label, cut into num_clients * classes_per_client shards, give each client classes_per_client.

    Shards are dealt round-robin in label order (so no client holds two shards of one class whenever no
    class spans more than num_clients shards), then mixed by random swaps that keep that property.
    """
    k = cfg.classes_per_client
    num_classes = np.unique(labels).size
    if k > num_classes:
        raise PartitionError(
            f"partition.classes_per_client={k} exceeds the {num_classes} classes in the training set: lower it"
        )
    num_shards = num_clients * k
    if num_shards > labels.size:
        raise PartitionError(
            f"{num_shards} shards (federation.num_clients x partition.classes_per_client) exceed the "
            f"{labels.size} samples: lower one of them"
        )
    order = rng.permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]  # label-sorted, random within a class
    shards = np.array_split(order, num_shards)
    shard_class = np.array([np.bincount(labels[s]).argmax() for s in shards])
    owner = np.arange(num_shards) % num_clients
    held = [list(np.flatnonzero(owner == c)) for c in range(num_clients)]  # shard ids per client
    if num_clients > 1:
        _swap_shards(held, shard_class, rng, SHARD_SWAPS_PER_SHARD * num_shards)
    parts = [np.concatenate([shards[s] for s in ids]) for ids in held]
    smallest = min(p.size for p in parts)
    if smallest < cfg.min_samples:
        raise PartitionError(
            f"shards give some client only {smallest} samples < partition.min_samples={cfg.min_samples}: lower "
            "partition.min_samples, partition.classes_per_client or federation.num_clients"
        )
    return parts


def _swap_shards(
    held: list[list[int]], shard_class: np.ndarray, rng: np.random.Generator, steps: int
) -> None:
    """Random shard swaps between two clients, skipped when either would receive a class it already has."""
    k = len(held[0])
    a, b = rng.integers(0, len(held), size=(2, steps))
    slot_a, slot_b = rng.integers(0, k, size=(2, steps))
    for i in range(steps):
        ca, cb = held[a[i]], held[b[i]]
        sa, sb = ca[slot_a[i]], cb[slot_b[i]]
        class_a, class_b = shard_class[sa], shard_class[sb]
        if a[i] == b[i] or class_a == class_b:
            continue
        if any(shard_class[s] == class_b for s in ca) or any(shard_class[s] == class_a for s in cb):
            continue
        ca[slot_a[i]], cb[slot_b[i]] = sb, sa


def partition_stats(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> dict:
    """Sizes, per-client class histogram and the mean label entropy in bits (lower = more skew)."""
    labels = np.asarray(labels)
    histogram = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    sizes = histogram.sum(axis=1)
    probs = histogram / np.maximum(sizes, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log2(probs), 0.0).sum(axis=1)
    return {
        "num_clients": len(parts),
        "sizes": [int(s) for s in sizes],
        "histogram": histogram.astype(int).tolist(),
        "mean_label_entropy": float(entropy.mean()),
    }


# --- persistence: clients.json records what the split was made from, and is checked before use ------------

# the three ways to run it: DVC, the command line, the Prefect UI (`flows.serve`'s deployments)
STAGE = "`dvc repro partition`, `python -m flows.partition` or, in the Prefect UI, the partition deployment"
CLIENTS_FILE = "clients.json"  # the saved split; stats.json and the heat map beside it
RERUN = f"re-run the partition stage with this run's settings ({STAGE})"


def partition_origin(config: ExperimentConfig, labels: np.ndarray) -> dict[str, Any]:
    """What a split is made from, keyed like the config: written with it, compared before training uses it.

    The keys are checked in this order, so a changed `data.train_limit` is named before its consequences.
    """
    labels = np.ascontiguousarray(labels, dtype="<i8")
    return {
        "data.name": config.data.name,
        "data.train_limit": config.data.train_limit,
        "federation.num_clients": config.federation.num_clients,
        **{f"partition.{k}": v for k, v in config.partition.model_dump(mode="json").items()},
        "training samples": int(labels.size),
        "training labels sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
    }


def save_partition(parts: list[np.ndarray], stats: dict, out_dir: str | Path, origin: dict[str, Any]) -> None:
    """Write out_dir/clients.json ({"num_clients", "clients": [[idx, ...], ...], "origin"}) and stats.json.

    `origin` is :func:`partition_origin` of the config and labels the split was made from.
    """
    out_dir = Path(out_dir)
    clients = [np.asarray(p, dtype=np.int64).tolist() for p in parts]
    write_json(out_dir / CLIENTS_FILE, {"num_clients": len(clients), "clients": clients, "origin": origin})
    write_json(out_dir / "stats.json", stats)


def write_partition(config: ExperimentConfig, labels: np.ndarray, num_classes: int) -> tuple[list[np.ndarray], dict]:
    """Split `labels` as `config` says and save the split, its origin and its stats in
    `runtime.partitions_dir` (the partition stage's work); returns (parts, stats)."""
    parts = partition_indices(labels, config.federation.num_clients, config.partition)
    stats = partition_stats(parts, labels, num_classes)
    save_partition(parts, stats, config.runtime.partitions_dir, origin=partition_origin(config, labels))
    return parts, stats


def load_partition(out_dir: str | Path, expected: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Read out_dir/clients.json back into int64 arrays, refusing anything training could trip over.

    Always checked: valid JSON with a recorded origin; one non-empty list of integer indices per recorded
    client; every index within the recorded training set; no index in two clients. With `expected`
    (:func:`partition_origin` of this run) the record must also match it: same dataset, limit, labels,
    partition settings and number of clients. Every failure is a :class:`PartitionError` saying to
    re-run the partition stage.
    """
    path = Path(out_dir) / CLIENTS_FILE
    raw = _read_saved(path)
    origin = raw["origin"]
    if expected is not None:
        _check_origin(path, origin, expected)
    count, made_for = len(raw["clients"]), origin["federation.num_clients"]
    if count < 1 or raw.get("num_clients") != count or count != made_for:
        raise PartitionError(
            f"{path} holds {count} client lists, says num_clients={raw.get('num_clients')} and was made for "
            f"{made_for} clients; {RERUN}"
        )
    parts = [_client_indices(path, i, c, origin["training samples"]) for i, c in enumerate(raw["clients"])]
    _check_disjoint(path, parts)
    return parts


def partition_digest(out_dir: str | Path) -> str:
    """:func:`split_digest` of the split saved in `out_dir`."""
    return split_digest(load_partition(out_dir))


def split_digest(parts: list[np.ndarray]) -> str:
    """A sha256 of a split (which samples each client holds, in client order), hex.

    It depends only on the index lists: not on JSON formatting nor on the recorded origin, so two saves of
    the same split agree, and any moved, added or removed sample changes it.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(np.int64(part.size).astype("<i8").tobytes())
        digest.update(np.asarray(part).astype("<i8").tobytes())
    return digest.hexdigest()


_COUNTS_RECORDED = ("federation.num_clients", "training samples")  # what the checks without `expected` use


def _read_saved(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PartitionMissing(f"{path} does not exist: run the partition stage first ({STAGE})")
    try:
        raw = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise PartitionError(f"{path} is not valid JSON ({exc}); {RERUN}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("clients"), list):
        raise PartitionError(f"{path}: expected {{'num_clients': N, 'clients': [[...], ...], ...}}; {RERUN}")
    origin = raw.get("origin")
    if not isinstance(origin, dict) or not all(type(origin.get(k)) is int for k in _COUNTS_RECORDED):
        raise PartitionError(
            f"{path} does not record which data and settings it was made from (written by an older version, "
            f"or edited), so it cannot be checked against this run; {RERUN}"
        )
    return raw


def _check_origin(path: Path, recorded: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        got = recorded.get(key)
        if got != want:
            raise PartitionError(
                f"{path} was made for {key}={_shown(got)} but this run has {key}={_shown(want)}; {RERUN}"
            )


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def _client_indices(path: Path, client: int, indices: Any, num_samples: int) -> np.ndarray:
    if not isinstance(indices, list) or not all(type(i) is int for i in indices):  # bool, float, str: no
        bad = indices if not isinstance(indices, list) else next(i for i in indices if type(i) is not int)
        raise PartitionError(f"{path}: client {client} holds {bad!r}, not an integer sample index; {RERUN}")
    if not indices:
        raise PartitionError(f"{path}: client {client} holds no samples; {RERUN}")
    low, high = min(indices), max(indices)
    if low < 0 or high >= num_samples:
        bad = low if low < 0 else high
        raise PartitionError(
            f"{path}: client {client} holds sample {bad}, outside the {num_samples} training samples "
            f"(0..{num_samples - 1}) it was made for; {RERUN}"
        )
    return np.asarray(indices, dtype=np.int64)


def _check_disjoint(path: Path, parts: list[np.ndarray]) -> None:
    owners = np.repeat(np.arange(len(parts)), [p.size for p in parts])
    flat = np.concatenate(parts)
    order = np.argsort(flat, kind="stable")
    repeated = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    if repeated.size:
        first, second = order[repeated[0]], order[repeated[0] + 1]
        where = (f"clients {owners[first]} and {owners[second]}" if owners[first] != owners[second]
                 else f"client {owners[first]} (twice)")
        raise PartitionError(f"{path}: sample {flat[first]} is held by {where}; {RERUN}")
