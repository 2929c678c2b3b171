"""SAP's bool work on CPU, compiled: selection and bit packing in one pass over a tensor, compaction in another.

Before, keeping the entries ``|x| >= t`` of an activation took six NumPy/torch passes (magnitude, comparison,
positions as int64, gather, cast, bit packing) and its backward three (unpack, positions, scatter). Here a
tensor is cut into one chunk per torch CPU thread (chunk bounds on byte boundaries of the bitmap) and each
chunk is one compiled loop (Numba, ``nogil``, run on a small thread pool of this module):

- :func:`keep_bits`: the packed bitmap of ``|x| >= t`` (``|x| > 0`` when ``t <= 0``) and the kept count of
  every chunk, reading ``x`` once (a loop with no stores but the bitmap's: vectorised); the count decides
  whether the threshold is kept (:func:`fedmef_core.sap.select`) before anything is compacted;
- :meth:`Kept.gathered`: the kept values and (for ``index`` positions) their int32 flat positions, in flat
  order, reading ``x`` and the bitmap once; each chunk writes its own stretch of the exact-sized output (a
  one-pass compaction into a scratch buffer of ``x``'s size, joined after, measured ~25% slower: the scratch's
  fresh pages and the join cost more than reading ``x`` twice);
- :func:`scatter`: the inverse: a dense tensor from the bitmap and the values, writing every entry once
  (float16 values are decoded on the way through a 64K-entry table: no float32 copy of them first);
- :func:`relu` / :func:`mask_grad`: the ReLU's output with its 1-bit mask, and its backward, one pass each
  (a channels-last tensor sample by sample, through a scratch of one sample's size: no NCHW copy of it).

The bitmap is :func:`numpy.packbits`'s layout (first entry in the highest bit, zero-padded at the end), so
what is saved is byte for byte what the NumPy path saves; the tests compare the two. Float32 and float64
tensors go this way; other dtypes (and other devices) keep the NumPy/torch path of :mod:`fedmef_core.sap`.
Compiled code is cached beside this file (``__pycache__``) after the first use in a process tree.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

MIN_CHUNK = 1 << 16  # entries: below this one chunk (a thread hand-off costs more than the work)
_FLOATS = {torch.float32, torch.float64}
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def usable(t: torch.Tensor) -> bool:
    """Whether the compiled kernels handle ``t`` (a CPU float32/float64 tensor)."""
    return handles(t.device, t.dtype)


def handles(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _FLOATS


# ---- compiled loops, one chunk each (views that start at the chunk's first entry, a multiple of 8) -------
# Branch-free inner loops of 8 (one bitmap byte) from index 0 of their views: LLVM then vectorises the
# comparisons, bit assembly and masking (with a chunk offset in the indices it did not: 6-9x slower), and
# the compaction stores every entry and advances by its bit (no unpredictable branch).
@njit(nogil=True, cache=True)
def _bits(x, t, bitmap):  # pragma: no cover - compiled
    """Bits of ``|x| >= t`` (``|x| > 0`` when -inf < t <= 0; all when t is -inf) into bitmap; returns how many
    are set. Reads x only (no stores but the bitmap's), so LLVM vectorises it."""
    strict = -np.inf < t <= 0.0
    n = x.size
    k = 0
    for b in range(n // 8):
        byte = 0
        for j in range(8):
            a = abs(x[b * 8 + j])
            bit = (a > 0.0) if strict else (a >= t)
            byte |= bit << (7 - j)
            k += bit
        bitmap[b] = byte
    if n % 8:  # the last, partial byte (zero-padded)
        byte = 0
        for i in range(n // 8 * 8, n):
            a = abs(x[i])
            bit = (a > 0.0) if strict else (a >= t)
            byte |= bit << (7 - i % 8)
            k += bit
        bitmap[n // 8] = byte
    return k


@njit(nogil=True, cache=True)
def _gather(x, bitmap, values, positions, first):  # pragma: no cover - compiled
    """The entries of x whose bit is set into values (exactly as many as are set) and, when positions is not
    empty, their flat positions counted from `first`. Branch-free while 8 more stores fit: every entry is
    stored and the next store advances by its bit (a store past the last kept value would not fit)."""
    with_positions = positions.size > 0
    n = x.size
    room = values.size
    k = 0
    for b in range(n // 8):
        byte = bitmap[b]
        if k + 8 <= room:
            for j in range(8):
                values[k] = x[b * 8 + j]
                if with_positions:
                    positions[k] = first + b * 8 + j
                k += (byte >> (7 - j)) & 1
        else:
            for j in range(8):
                if (byte >> (7 - j)) & 1:
                    values[k] = x[b * 8 + j]
                    if with_positions:
                        positions[k] = first + b * 8 + j
                    k += 1
    for i in range(n // 8 * 8, n):
        if (bitmap[i // 8] >> (7 - i % 8)) & 1:
            values[k] = x[i]
            if with_positions:
                positions[k] = first + i
            k += 1


@njit(nogil=True, cache=True)
def _count(bitmap, table):  # pragma: no cover - compiled
    count = 0
    for j in range(bitmap.size):
        count += table[bitmap[j]]
    return count


def _value(values, table, k):  # pragma: no cover - compiled (the overload below)
    """values[k], decoded through table when values are float16 bit patterns (uint16)."""


@overload(_value)
def _value_impl(values, table, k):
    if isinstance(values.dtype, types.Integer):
        return lambda values, table, k: table[values[k]]
    return lambda values, table, k: values[k]


@njit(nogil=True, cache=True)
def _scatter(bitmap, values, table, out):  # pragma: no cover - compiled
    """out: the next of values (decoded by :func:`_value`) where the bit is 1, else 0."""
    if values.size == 0:
        out[:] = 0.0
        return
    last = values.size - 1
    k = 0
    n = out.size
    for b in range(n // 8):
        byte = bitmap[b]
        for j in range(8):
            bit = (byte >> (7 - j)) & 1
            v = _value(values, table, min(k, last))
            out[b * 8 + j] = v if bit else 0.0
            k += bit
    for i in range(n // 8 * 8, n):
        bit = (bitmap[i // 8] >> (7 - i % 8)) & 1
        v = _value(values, table, min(k, last))
        out[i] = v if bit else 0.0
        k += bit


@njit(nogil=True, cache=True, inline="always")
def _clamped(v, high):  # pragma: no cover - compiled
    """``v`` clamped to [0, high] as torch's clamp does it (-0.0 and NaN pass through)."""
    return 0.0 if v < 0.0 else (high if v > high else v)


@njit(nogil=True, cache=True)
def _relu(x, high, out, bitmap):  # pragma: no cover - compiled
    """Bits of ``0 < x < high`` into bitmap and (when out is not empty) x clamped to [0, high] into out, as
    torch's clamp does it (-0.0 and NaN pass through)."""
    with_out = out.size > 0
    n = x.size
    for b in range(n // 8):
        byte = 0
        for j in range(8):
            v = x[b * 8 + j]
            if with_out:
                out[b * 8 + j] = _clamped(v, high)
            byte |= ((v > 0.0) & (v < high)) << (7 - j)
        bitmap[b] = byte
    if n % 8:
        byte = 0
        for i in range(n // 8 * 8, n):
            v = x[i]
            if with_out:
                out[i] = _clamped(v, high)
            byte |= ((v > 0.0) & (v < high)) << (7 - i % 8)
        bitmap[n // 8] = byte


@njit(nogil=True, cache=True)
def _mask(grad, bitmap, out):  # pragma: no cover - compiled
    n = grad.size
    for b in range(n // 8):
        byte = bitmap[b]
        for j in range(8):
            out[b * 8 + j] = grad[b * 8 + j] if (byte >> (7 - j)) & 1 else 0.0
    for i in range(n // 8 * 8, n):
        out[i] = grad[i] if (bitmap[i // 8] >> (7 - i % 8)) & 1 else 0.0


# Channels-last tensors (the small CNN keeps its activations so): memory is (sample, H*W, C), the bitmap is in
# flat (logical: C, H, W) order. Each sample is turned plane by plane into a scratch of its own size (in
# cache) and the loops above run on it: a tensor-wide NCHW copy first cost more than the kernels themselves.
@njit(nogil=True, cache=True)
def _planar(xs, scratch):  # pragma: no cover - compiled
    """One sample's (H*W, C) memory into ``scratch`` in (C, H*W) order."""
    hw, ch = xs.shape
    for p in range(hw):
        for c in range(ch):
            scratch[c * hw + p] = xs[p, c]


@njit(nogil=True, cache=True)
def _clamp(x, high, out):  # pragma: no cover - compiled
    for i in range(x.size):
        out[i] = _clamped(x[i], high)


@njit(nogil=True, cache=True)
def _relu_planes(x, high, out, bitmap):  # pragma: no cover - compiled
    """:func:`_relu` for samples in channels-last memory (``x``, ``out``: (n, H*W, C)): out in the same
    layout, the bits in flat order (``bitmap``: n * H*W*C / 8 bytes)."""
    n, hw, ch = x.shape
    per = hw * ch
    _clamp(x.reshape(n * per), high, out.reshape(n * per))
    scratch = np.empty(per, dtype=x.dtype)
    for s in range(n):
        _planar(x[s], scratch)
        _relu(scratch, high, scratch[:0], bitmap[s * per // 8:(s + 1) * per // 8])


@njit(nogil=True, cache=True)
def _mask_planes(grad, bitmap, out):  # pragma: no cover - compiled
    """:func:`_mask` for a gradient in channels-last memory (n, H*W, C); ``out`` flat, in flat order."""
    n, hw, ch = grad.shape
    per = hw * ch
    scratch = np.empty(per, dtype=grad.dtype)
    for s in range(n):
        _planar(grad[s], scratch)
        _mask(scratch, bitmap[s * per // 8:(s + 1) * per // 8], out[s * per:(s + 1) * per])


# ---- chunking and threads ---------------------------------------------------------------------------
def _chunks(n: int, entries: int, align: int) -> list[tuple[int, int]]:
    """[0, n) in one [lo, hi) per torch CPU thread, each lo a multiple of `align`; fewer chunks when the
    `entries` they cover would give one less than MIN_CHUNK (a thread hand-off would cost more)."""
    parts = max(1, min(torch.get_num_threads(), entries // MIN_CHUNK, n))
    share = -(-n // parts)
    step = max(align, -(-share // align) * align)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)] or [(0, 0)]


def _bounds(n: int) -> list[tuple[int, int]]:
    """Chunks of a flat tensor of `n` entries, lo on a multiple of 8 (a whole bitmap byte)."""
    return _chunks(n, n, 8)


def _sample_bounds(planes: np.ndarray) -> list[tuple[int, int]]:
    """Chunks of channels-last memory (n, H*W, C): whole samples."""
    return _chunks(planes.shape[0], planes.size, 1)


def _planes(t: torch.Tensor) -> np.ndarray | None:
    """A channels-last 4-D tensor's memory as (N, H*W, C) when every sample's C*H*W entries fill whole bitmap
    bytes; else None (a tensor contiguous in flat order, or one the kernels read through an NCHW copy)."""
    if t.dim() != 4 or t.is_contiguous() or not t.is_contiguous(memory_format=torch.channels_last):
        return None
    n, c, h, w = t.shape
    if (c * h * w) % 8:
        return None
    return t.detach().permute(0, 2, 3, 1).numpy().reshape(n, h * w, c)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="sap")
        return _POOL


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when one is needed."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def _each(bounds: list[tuple[int, int]], work) -> list:
    """``work(lo, hi)`` for every chunk: the first in this thread, the others on the pool."""
    if len(bounds) == 1:
        return [work(*bounds[0])]
    futures = [_pool().submit(work, lo, hi) for lo, hi in bounds[1:]]
    first = work(*bounds[0])
    return [first, *(f.result() for f in futures)]


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).numpy()


# ---- the operations ---------------------------------------------------------------------------------
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def keep_bits(x: torch.Tensor, threshold: float) -> Kept:
    """The packed bitmap of the entries of ``x`` with ``|x| >= threshold`` (``|x| > 0`` when threshold <= 0; all
    of them when it is -inf) and how many there are; :meth:`Kept.gathered` then compacts them."""
    a = _flat(x)
    bounds = _bounds(a.size)
    bitmap = np.empty((a.size + 7) // 8, dtype=np.uint8)
    counts = _each(bounds, lambda lo, hi: _bits(a[lo:hi], float(threshold), bitmap[lo // 8:(hi + 7) // 8]))
    return Kept(a, x.dtype, bitmap, bounds, counts)


class Kept:
    """What :func:`keep_bits` selected: the bitmap and the kept count of every chunk."""

    def __init__(self, flat: np.ndarray, dtype: torch.dtype, bitmap: np.ndarray, bounds: list[tuple[int, int]],
                 counts: list[int]):
        self._flat, self._dtype, self.bitmap, self._bounds, self._counts = flat, dtype, bitmap, bounds, counts
        self.total = int(sum(counts))

    def packed(self) -> torch.Tensor:
        return torch.from_numpy(self.bitmap)

    def gathered(self, dtype: torch.dtype, with_positions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept values (as ``dtype``) and, if asked, their int32 flat positions, in flat order; each chunk
        writes its own stretch of the output."""
        a = self._flat
        values = torch.empty(self.total, dtype=self._dtype)
        positions = torch.empty(self.total if with_positions else 0, dtype=torch.int32)
        v, p = values.numpy(), positions.numpy()
        starts = np.cumsum([0, *self._counts[:-1]]).tolist()
        spans = {lo: (at, at + count) for (lo, _), at, count in zip(self._bounds, starts, self._counts)}

        def work(lo: int, hi: int) -> None:
            at, to = spans[lo]
            _gather(a[lo:hi], self.bitmap[lo // 8:(hi + 7) // 8], v[at:to],
                    p[at:to] if with_positions else p, lo)

        _each(self._bounds, work)
        return values.to(dtype), positions if with_positions else None


def scatter(packed: torch.Tensor, values: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`keep_bits` and :meth:`Kept.gathered`: a flat ``dtype`` tensor of ``numel`` entries, zero
    where the bitmap is 0 and the next value where it is 1."""
    bitmap = packed.numpy()
    out = torch.empty(numel, dtype=dtype)
    if values.dtype == torch.float16:  # decoded while scattering: no float32 copy of the values first
        v, table = values.contiguous().view(torch.int16).numpy().view(np.uint16), _half_table(dtype)
    else:
        v, table = values.to(dtype).contiguous().numpy(), _NO_TABLE
    o = out.numpy()
    bounds = _bounds(numel)
    if len(bounds) == 1:
        starts = {bounds[0]: 0}
    else:
        counts = _each(bounds, lambda lo, hi: _count(bitmap[lo // 8:(hi + 7) // 8], _POPCOUNT))
        starts = dict(zip(bounds, np.cumsum([0, *counts[:-1]]).tolist()))
    _each(bounds, lambda lo, hi: _scatter(bitmap[lo // 8:(hi + 7) // 8], v[starts[lo, hi]:], table, o[lo:hi]))
    return out


_NO_TABLE = np.empty(0, dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _half_table(dtype: torch.dtype) -> np.ndarray:
    """Every float16 bit pattern as ``dtype`` (torch's conversion, exact: float16 -> float32/64 loses nothing)."""
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).to(dtype).numpy()


def relu(x: torch.Tensor, max_val: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.clamp(0, max_val)`` (bit for bit, in x's memory format) and the packed bits of ``x > 0``
    (``0 < x < max_val``) in flat order. One pass writes both for a contiguous ``x`` (torch's clamp and a pass
    for the bits took ~1.3x the time); a channels-last ``x`` is read sample by sample (:func:`_relu_planes`);
    any other layout clamps with torch and takes the bits from an NCHW copy."""
    high = np.inf if max_val is None else float(max_val)
    planes = _planes(x)
    if planes is not None:
        out = torch.empty_like(x)  # channels-last too
        o, per = _planes(out), planes.shape[1] * planes.shape[2]
        bitmap = np.empty(x.numel() // 8, dtype=np.uint8)
        _each(_sample_bounds(planes),
              lambda lo, hi: _relu_planes(planes[lo:hi], high, o[lo:hi], bitmap[lo * per // 8:hi * per // 8]))
        return out, torch.from_numpy(bitmap)
    a = _flat(x)
    fused = x.is_contiguous()
    out = torch.empty_like(x) if fused else x.clamp(0, max_val)
    o = out.view(-1).numpy() if fused else a[:0]
    bitmap = np.empty((a.size + 7) // 8, dtype=np.uint8)
    _each(_bounds(a.size), lambda lo, hi: _relu(a[lo:hi], high, o[lo:hi], bitmap[lo // 8:(hi + 7) // 8]))
    return out, torch.from_numpy(bitmap)


def mask_grad(grad: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``grad`` where the packed bit is 1, else 0 (grad's shape, contiguous)."""
    bitmap = packed.numpy()
    planes = _planes(grad)
    if planes is not None:
        out = np.empty(grad.numel(), dtype=planes.dtype)
        per = planes.shape[1] * planes.shape[2]
        _each(_sample_bounds(planes), lambda lo, hi: _mask_planes(planes[lo:hi], bitmap[lo * per // 8:hi * per // 8],
                                                                   out[lo * per:hi * per]))
        return torch.from_numpy(out).view(grad.shape)
    g = _flat(grad)
    out = np.empty_like(g)
    _each(_bounds(g.size), lambda lo, hi: _mask(g[lo:hi], bitmap[lo // 8:(hi + 7) // 8], out[lo:hi]))
    return torch.from_numpy(out).view(grad.shape)
