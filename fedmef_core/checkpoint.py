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
    """A training checkpoint (what `Server.checkpoint` returns): verified, and refused unless it holds one."""
    ckpt = load_verified(path)
    if problem := _content_problem(ckpt):
        raise CheckpointError(f"{path}: passes its checksum but is not a checkpoint this tool wrote ({problem}); "
                              "not loaded")
    return ckpt


def load_verified(path: str | Path) -> Any:
    """What `save_checkpoint` wrote to `path` (any payload: a checkpoint, a round's masks), once its checksum
    verifies."""
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


CHECKPOINT_FIELDS = {"round": int, "model": dict, "server_state": dict, "history": list, "torch_rng": torch.Tensor,
                     "config": dict, "extra": dict}


def _content_problem(ckpt: Any) -> str | None:
    """What keeps `ckpt` (a loaded checkpoint) from being one `Server.checkpoint` wrote, or None."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict"
    for key, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            got = "nothing" if key not in ckpt else f"a {type(ckpt[key]).__name__}"
            return f"{key!r} holds {got}, not a {kind.__name__}"
    if ckpt["round"] < 0:
        return f"'round' is {ckpt['round']}"
    if bad := next((k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)), None):
        return f"model weight {bad!r} is not a tensor"
    return None


def check_layout(path: str | Path, ckpt: dict[str, Any], reference: dict[str, Any]) -> None:
    """`ckpt`'s weights (and the server state's tensors they share a name with) have the names, shapes and
    dtypes of `reference`'s — a checkpoint of the model it is to be loaded into; else :class:`CheckpointError`."""
    state = reference.get("server_state", {})
    problem = _layout_problem(reference.get("model", {}), ckpt["model"], "model weight", every_key=True) or \
        _layout_problem(state, ckpt["server_state"], "server state", every_key=False)
    if not problem and "masks" in state:  # a mask for every prunable layer, none for another
        problem = _layout_problem(state["masks"], ckpt["server_state"].get("masks"), "mask", every_key=True)
    if problem:
        raise CheckpointError(f"{path}: passes its checksum but holds weights of another shape ({problem}); "
                              "not loaded")


def _layout_problem(want: Any, got: Any, where: str, every_key: bool) -> str | None:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where} is a {type(got).__name__}, not a tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{where} is {got.dtype} {tuple(got.shape)}, the model's is {want.dtype} {tuple(want.shape)}"
        return None
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{where} is a {type(got).__name__}, not a dict"
        if every_key and (missing := sorted(set(want) - set(got)) or sorted(set(got) - set(want))):
            return f"{where} {missing[0]!r} is {'missing' if missing[0] in want else 'not in the model'}"
        for key in want.keys() & got.keys():
            if problem := _layout_problem(want[key], got[key], f"{where} {key!r}", every_key):
                return problem
    return None


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
    directory: str | Path, accept: Callable[[dict[str, Any], Path], bool] = lambda *_: True,
    on_skip: Callable[[str], None] = lambda _: None,
) -> dict[str, Any] | None:
    """The newest round checkpoint that verifies and that `accept` takes; damaged ones (and those `accept`
    raises :class:`CheckpointError` for) are reported and skipped."""
    for _, path in reversed(round_checkpoints(directory)):
        try:
            ckpt = load_checkpoint(path)
            if accept(ckpt, path):
                return ckpt
        except CheckpointError as exc:
            on_skip(str(exc))
            continue
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
