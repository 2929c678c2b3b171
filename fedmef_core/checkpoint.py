"""Checkpoints: plain dicts of tensors and numbers, written atomically, verified, loaded with weights_only=True.

Each `X.pt` gets a sidecar `X.pt.sha256` written after it. A checkpoint whose sidecar is missing (the
write was interrupted) or does not match (the file was truncated or damaged) is refused, never loaded.

Exchange files (a round's broadcast and client updates, handed between processes and deleted within the
round) are written atomically too but carry no checksum: they never outlive a round, the folder they live
in is cleared when a run starts, and hashing them twice cost a third of the per-client exchange time.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedmef_core.errors import UserError
from fedmef_core.io import atomic_path, write_bytes, write_text

_ROUND_FILE = re.compile(r"^round_(\d+)\.pt$")
FINAL_NAME = "final.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated, damaged or not ours."""


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    write_bytes(path, data)
    write_text(_digest_path(path), hashlib.sha256(data).hexdigest() + "\n")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; run the train stage first (`dvc repro train`)")
    data = path.read_bytes()
    digest = _digest_path(path)
    if not digest.is_file():
        raise CheckpointError(f"{path}: no checksum file {digest.name} (its write was interrupted); not loaded")
    if digest.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"{path}: checksum mismatch, the file is truncated or damaged; not loaded")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None


def save_exchange(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a round's exchange file (atomic: a reader sees all of it or no file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_exchange(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the exchange file is gone (was the run folder cleared by another run?)") \
            from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not ours
        raise CheckpointError(f"{path}: cannot be read as an exchange file ({type(exc).__name__}: {exc})") \
            from None


def round_checkpoint_path(directory: str | Path, rnd: int) -> Path:
    return Path(directory) / f"round_{rnd:04d}.pt"


def round_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """The round checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _ROUND_FILE.match(p.name))]
    return sorted(found)


def latest_good_checkpoint(
    directory: str | Path, accept: Callable[[dict[str, Any]], bool] = lambda _: True,
    on_skip: Callable[[str], None] = lambda _: None,
) -> dict[str, Any] | None:
    """The newest round checkpoint that verifies and that `accept` takes; damaged ones are reported and skipped."""
    for _, path in reversed(round_checkpoints(directory)):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            on_skip(str(exc))
            continue
        if accept(ckpt):
            return ckpt
        on_skip(f"{path}: written by a different configuration; not resumed")
    return None


def remove_checkpoints(directory: str | Path) -> None:
    """Delete round and final checkpoints (and their checksums) left by an earlier, different run."""
    directory = Path(directory)
    for _, path in round_checkpoints(directory):
        path.unlink(missing_ok=True)
        _digest_path(path).unlink(missing_ok=True)
    for path in (directory / FINAL_NAME, _digest_path(directory / FINAL_NAME)):
        path.unlink(missing_ok=True)
