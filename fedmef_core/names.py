"""Text a user types that becomes a name: each kind of name has one point where it is checked or made safe.

- :func:`folder_name` — a name that becomes one folder (a sweep's name under ``<root>/sweeps/``) is *refused*
  unless it is one plain path component: a name that MLflow also shows and that a re-run finds its results by
  must stay the name the user typed, and two names made equal by a rewrite would share a folder.
- :func:`metric_key` — the parts of a metric name (a device tier, a method, a density) are *made safe*: a part
  holds only what MLflow accepts in a metric name (letters, digits, ``_ - . space``), every other character
  becomes ``_``; ``/`` only ever separates the parts. These parts come from validated config or from numbers,
  so the rewrite only guards against what a validation missed, and never lets MLflow refuse a metric.
- :func:`number_name` — a number as part of a name: exact and without ``+`` or ``e`` (``1048576``, ``64_5``).

Values inside MLflow search filters have their own single point, in :mod:`services.tracking.tracker`
(``filter_value``), beside the only code that speaks to MLflow.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

MAX_FOLDER_NAME = 200  # bytes most file systems allow in one name are 255
MAX_METRIC_NAME = 250  # MLflow's limit on a metric name
_UNSAFE_IN_METRIC = re.compile(r"[^A-Za-z0-9_.\- ]")


def folder_name(text: str, what: str) -> str:
    """`text` itself if it can be one folder's name, else a `ValueError` saying why and what to type."""
    why = None
    if not text or not text.strip():
        why = "is empty"
    elif text in (".", ".."):
        why = "names the folder itself or its parent"
    elif "/" in text or "\\" in text:
        why = "holds a path separator (/ or \\), which would put it in another folder"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        why = "holds a control character"
    elif not is_utf8(text):
        why = "holds a byte that is not UTF-8 (from the shell or a file name in another encoding)"
    elif len(text.encode()) > MAX_FOLDER_NAME:
        why = f"is longer than {MAX_FOLDER_NAME} bytes"
    if why:
        raise ValueError(f"{what} {text!r} {why}; it names a folder: give one plain name, e.g. "
                         f"{_example(text)!r}")
    return text


def _example(text: str) -> str:
    plain = re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-.")[:40]
    return plain or "my-sweep"


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (a byte the OS could not decode arrives as a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def metric_key(*parts: str) -> str:
    """The metric name ``part/part/...`` with each part made safe for MLflow (module doc); a name past MLflow's 250
    characters keeps its first ones and ends in a digest of the whole, so two long names stay apart."""
    safe = []
    for part in parts:
        part = _UNSAFE_IN_METRIC.sub("_", str(part)).strip(" ")
        safe.append("_" if part in ("", ".", "..") else part)
    key = "/".join(safe)
    if len(key) <= MAX_METRIC_NAME:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{key[:MAX_METRIC_NAME - len(digest) - 1]}-{digest}"


def number_name(value: float) -> str:
    """`value` exactly (the shortest digits that read back as it), positional, ``.`` written ``_``."""
    return np.format_float_positional(float(value), trim="-").replace(".", "_")
