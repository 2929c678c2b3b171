"""Atomic file writes: a temp file beside the target, then `os.replace`.

An interrupted run never leaves a half-written file behind. Files get the usual mode of a new file
(0666 less the umask, e.g. 0644), so a Ray worker or a colleague running as another user can read them.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmef_core.errors import UserError


class WriteFailed(UserError):
    """A write the file system refused: the message names the file and the fix; what was there is kept."""


class DiskFull(WriteFailed):
    """A write found no space left on its device (or the user's quota spent)."""


class NotPermitted(WriteFailed):
    """A write refused for its permissions: a folder or file made read-only (chmod, chattr +i, a read-only
    mount), or owned by another user."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)
KEPT = "What was written before is kept whole: a training resumes from its last checkpoint"


def write_failure(path: Path, exc: BaseException) -> WriteFailed | None:
    """The one-line error of a failed write of `path` the user can fix (module doc), or None for any other
    failure. A library that does not pass ENOSPC on (torch.save: ``RuntimeError: ... unexpected pos``) is
    recognised by the file system it wrote to being full."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code in NOT_PERMITTED:
        return NotPermitted(f"cannot write {path}: {os.strerror(code).lower()}; make {path.parent} writable for "
                            f"this user (chmod, chattr -i, a read-write mount) or write elsewhere (a run's "
                            f"runtime.run_dir, a sweep's --root), and run again. {KEPT}")
    if code in DISK_FULL or _full(path.parent):
        return DiskFull(f"cannot write {path}: {os.strerror(code if code in DISK_FULL else errno.ENOSPC).lower()}; "
                        f"free some space there (or write elsewhere: a run's runtime.run_dir, a sweep's --root) and "
                        f"run again. {KEPT}")
    return None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `path` atomically. A write the user can
    fix, at any step — a full disk, a folder made read-only — leaves `path` as it was and no temp file, and is
    one :class:`WriteFailed` message (:func:`write_failure`)."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_temp_file(path)
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as exc:
        code = exc.errno if isinstance(exc, OSError) else None
        if not (code in NOT_PERMITTED or code in DISK_FULL or _full(path.parent)):
            raise
        raise write_failure(path, exc) from None
    finally:
        if tmp_path is not None:
            try:
                tmp_path.unlink(missing_ok=True)
            except OSError:  # a folder made read-only after the temp file was made: it keeps it
                pass


FULL_BELOW = 1 << 20  # bytes free: a write that failed there failed for want of space


def _full(folder: Path) -> bool:
    """Whether `folder`'s file system is (all but) full — how a failed write by a library that does not pass
    ENOSPC on is recognised (torch.save: ``RuntimeError: ... unexpected pos``)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_BELOW


def _new_temp_file(path: Path) -> Path:
    """Create an empty, uniquely named file beside `path` with mode 0666 less the umask.

    (`tempfile.mkstemp` would make it 0600, and `os.replace` keeps that mode.)
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class InvalidFile(UserError, ValueError):
    """A file the tool wrote earlier no longer holds what it wrote (truncated, edited, another tool's)."""


class NotUtf8(InvalidFile):
    """A text file a user handed over is not UTF-8 (saved in another encoding, or not text at all)."""


def read_text(path: str | Path, what: str) -> str:
    """The text of a file a user hands over (`what` names its setting, e.g. ``devices.trace``), decoded as UTF-8;
    a file that is not is one :class:`NotUtf8` line naming the file, the line and the byte. `OSError` passes."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark (as Excel saves CSV) is not part of the text
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise NotUtf8(f"{what} {path}: byte 0x{data[exc.start]:02x} on line {line} is not UTF-8; save the file as "
                      "UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and run again") from None


NUMBER = (int, float)


def read_record(path: str | Path, fields: dict[str, type | tuple[type, ...]], fix: str) -> dict[str, Any]:
    """The JSON object in `path`, holding at least `fields` with their types (a bool is not a number); else an
    :class:`InvalidFile` naming the file, what is wrong, and `fix`. A missing file is ``FileNotFoundError``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidFile(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(raw, dict):
        raise InvalidFile(f"{path} holds a {type(raw).__name__}, not the JSON object this tool writes; {fix}")
    for key, kind in fields.items():
        value, kinds = raw.get(key), kind if isinstance(kind, tuple) else (kind,)
        if key not in raw or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            got = "nothing" if key not in raw else repr(value)[:40]
            raise InvalidFile(f"{path}: {key!r} holds {got}, not what this tool writes there; {fix}")
    return raw
