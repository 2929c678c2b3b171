"""Checkpoints: plain dicts of tensors and numbers, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from fedmef_core.errors import UserError
from fedmef_core.io import atomic_path

_ROUND_FILE = re.compile(r"^round_(\d+)\.pt$")
FINAL_NAME = "final.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated or not ours."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; run the train stage first (`dvc repro train`)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None


def round_checkpoint_path(directory: str | Path, rnd: int) -> Path:
    return Path(directory) / f"round_{rnd:04d}.pt"


def round_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """The round checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _ROUND_FILE.match(p.name))]
    return sorted(found)
