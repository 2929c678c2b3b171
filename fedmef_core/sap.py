"""Scaled activation pruning (SAP): Conv2d/Linear layers that save a pruned copy of their input.

Forward runs on the full input. For backward each layer saves only the (1 - gamma) fraction of its
input entries with the largest magnitude (over the whole tensor, batch included) and their positions
(int32 indices, or a bitmap with one bit per entry packed into uint8). Backward rebuilds the sparse
input for the weight gradient; the input gradient needs only the weight and is exact.

Which entries are kept: those with ``|x| >= t``, ``t`` about the k-th largest magnitude, ``k = n - floor(gamma
n)``; when ``t == 0`` only the non-zeros are kept (dropping a zero changes nothing). Up to 2^15 entries
``t`` is exact; above, it is the same quantile of 2^15 fixed pseudo-random entries (an exact selection over
millions of entries cost more than the layer's convolution), so the kept fraction is ``1 - gamma`` within
±1% of the entries; when a sample misses that (rare) the exact k-th value is used. With ties at ``t > 0``
(measure zero for real activations) or many zeros, more than k entries may be kept. What is kept is what
is saved, so the memory accounting (:mod:`fedmef_core.memory`) counts the real kept entries.

On CPU, float32/float64 activations go through compiled passes (:mod:`fedmef_core.sap_kernels`: selection
and bit packing in one pass, compaction in one, their inverse in one); other CPU dtypes through NumPy views of the
same memory (3-20x faster than torch's CPU kernels for it); on other devices torch does it. All three save
the same bytes.

Optionally ReLU/ReLU6 save a packed 1-bit mask instead of their output (``relu_bitmask``).

Every tensor is saved through ``ctx.save_for_backward``, so ``torch.autograd.graph.saved_tensors_hooks``
(and :mod:`fedmef_core.memory`) sees exactly what is kept.

Use :func:`apply_sap` to convert a model in place; :class:`~fedmef_core.models.nsconv.NSConv` layers
compute their standardized weight inside the same function (recomputed in backward, never saved).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.autograd import Function

from fedmef_core import sap_kernels
from fedmef_core.config import ExperimentConfig, SapConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)

WeightFn = Callable[..., torch.Tensor]
Kept = TypeVar("Kept")


def resolve_sap(config: ExperimentConfig) -> SapConfig | None:
    """The SAP settings local training uses, or None (a validated config has resolved ``sap.enabled: null``
    to the method's own choice)."""
    return config.sap if config.sap.enabled else None


# ---- bool kernels: NumPy on CPU, torch elsewhere ---------------------------------------------------
# On one CPU core torch's comparisons producing bool tensors, nonzero and float-times-bool run 3-8x slower
# than NumPy's on the same memory (measured at 6M entries), and they are most of SAP's extra work.
_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bool, torch.uint8}


def _host(t: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU tensor of a dtype NumPy knows (None otherwise: use torch)."""
    return t.detach().numpy() if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES else None


def greater(t: torch.Tensor, value: float) -> torch.Tensor:
    a = _host(t)
    return t > value if a is None else torch.from_numpy(np.greater(a, value))


def at_least(t: torch.Tensor, value: float) -> torch.Tensor:
    a = _host(t)
    return t >= value if a is None else torch.from_numpy(np.greater_equal(a, value))


def between(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``low < t < high``."""
    a = _host(t)
    if a is None:
        return (t > low) & (t < high)
    return torch.from_numpy(np.logical_and(np.greater(a, low), np.less(a, high)))


def masked(t: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``t`` times a bool tensor of the same shape."""
    a, m = _host(t), _host(live)
    return t * live if a is None or m is None else torch.from_numpy(a * m)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte, first entry in the highest bit (flattened, zero-padded
    at the end)."""
    flat = mask.reshape(-1)
    a = _host(flat)
    return _pack_bits_torch(flat) if a is None else torch.from_numpy(np.packbits(a))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` entries."""
    a = _host(packed)
    if a is None:
        return _unpack_bits_torch(packed, numel)
    return torch.from_numpy(np.unpackbits(a, count=numel).view(np.bool_))


def _pack_bits_torch(flat: torch.Tensor) -> torch.Tensor:
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    eights = flat.view(-1, 8).to(torch.uint8)
    packed = eights[:, 0] << 7
    for i in range(1, 8):
        packed |= eights[:, i] << (7 - i)
    return packed


def _unpack_bits_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).reshape(-1)[:numel]


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending flat positions (int64) of the True entries of a flat bool tensor."""
    a = _host(mask)
    return mask.nonzero().reshape(-1) if a is None else torch.from_numpy(np.flatnonzero(a))


def count_true(mask: torch.Tensor) -> int:
    a = _host(mask)
    return int(mask.sum()) if a is None else int(np.count_nonzero(a))


# ---- activation pruning --------------------------------------------------------------------------
SAMPLE = 1 << 15  # entries the threshold is estimated from; exact selection up to this size
KEEP_TOLERANCE = 0.01  # kept fraction within 1 - gamma +- this (as a fraction of all entries)


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random positions in a tensor of ``n`` entries (seeded by n: never the global RNG)."""
    return torch.randint(0, n, (SAMPLE,), generator=torch.Generator().manual_seed(n)).to(device)


def kept_entries(n: int, gamma: float) -> int:
    """k: how many of ``n`` entries SAP aims to keep, ``n - floor(gamma n)`` (= ceil((1 - gamma) n), robust to
    float rounding)."""
    return n - math.floor(gamma * n + 1e-9)


def packed_bytes(n: int) -> int:
    """Bytes of ``n`` entries packed one bit each (:func:`pack_bits`, a ReLU's 1-bit mask)."""
    return (n + 7) // 8


def kept_share(magnitudes: np.ndarray, n: int, gamma: float) -> float:
    """The share of an ``n``-entry input SAP keeps when its magnitudes are distributed like ``magnitudes`` (an
    ascending sample): all of them when k = :func:`kept_entries` reaches n, else those ``>= t`` with ``t`` the
    sample's value at the kept share (the non-zeros when ``t`` is 0: fewer than k; ties at ``t``: more)."""
    k = kept_entries(n, gamma)
    if k >= n or magnitudes.size == 0:
        return 1.0
    t = magnitudes[max(0, magnitudes.size - math.ceil(k / n * magnitudes.size))]
    zero = magnitudes.dtype.type(0)  # a scalar of another dtype would convert the whole array at every call
    at_least = np.searchsorted(magnitudes, zero, "right") if t <= 0 else np.searchsorted(magnitudes, t, "left")
    return float(magnitudes.size - at_least) / magnitudes.size


def saved_input_bytes(n: int, kept: int, sap: SapConfig) -> int:
    """Bytes a SAP layer saves of an ``n``-entry input of which it keeps ``kept``: the values (``sap.value_dtype``)
    and their positions (one int32 index each, or a bitmap of n bits)."""
    positions = packed_bytes(n) if sap.positions == "bitmap" else 4 * kept
    return kept * DTYPES[sap.value_dtype].itemsize + positions


def select(x: torch.Tensor, gamma: float, keep_at: Callable[[float], tuple[Kept, int]]) -> Kept:
    """What SAP keeps of ``x``, built by ``keep_at(t)``: the entries ``|x| >= t`` (the non-zeros when t <= 0,
    every entry when t is -inf) as a bool mask or a bitmap, with how many there are (module doc)."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    k = kept_entries(n, gamma)
    if k >= n:
        return keep_at(-math.inf)[0]
    if n <= SAMPLE:
        return keep_at(float(kth_largest(flat.abs().float(), k)))[0]
    sample = flat.index_select(0, _sample_positions(n, flat.device)).abs().float()
    threshold = float(torch.kthvalue(sample, SAMPLE - math.ceil(k / n * SAMPLE) + 1).values)
    keep, kept = keep_at(threshold)  # fewer than k is right when only the non-zeros are kept
    if kept > k + KEEP_TOLERANCE * n or (threshold > 0 and kept < k - KEEP_TOLERANCE * n):
        keep, _ = keep_at(float(kth_largest(flat.abs().float(), k)))  # the sample missed (or ties): exactly
    return keep


def keep_mask(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Flat bool mask of the entries SAP keeps: about the n - floor(gamma n) largest magnitudes (module doc)."""
    mag = x.detach().reshape(-1).abs()

    def mask_at(threshold: float) -> tuple[torch.Tensor, int]:
        if threshold == -math.inf:
            return torch.ones(mag.numel(), dtype=torch.bool, device=x.device), mag.numel()
        keep = _at_least(mag, threshold)
        return keep, count_true(keep)

    return select(x, gamma, mask_at)


def _at_least(mag: torch.Tensor, threshold: float) -> torch.Tensor:
    """``mag >= threshold``, or the non-zeros when the threshold is 0 (dropping a zero changes nothing)."""
    return greater(mag, 0.0) if threshold <= 0 else at_least(mag, threshold)


def kth_largest(values: torch.Tensor, k: int, exact_below: int = 1 << 15) -> torch.Tensor:
    """The exact k-th largest entry of a flat tensor (about 2x faster than ``kthvalue`` from 10^5 entries).

    A strided sample (n/32 entries, 2^11 to 2^15) brackets the answer: its quantile +- four standard
    errors. One counting pass checks the bracket and ``kthvalue`` runs only on the few entries inside
    it; when the bracket misses (rare) the full selection runs. Deterministic (no random numbers).
    """
    n = values.numel()
    if n <= exact_below:
        return torch.kthvalue(values, n - k + 1).values
    picked = torch.sort(values[:: n // min(max(n // 32, 1 << 11), 1 << 15)]).values
    m = picked.numel() - 1
    q = 1.0 - k / n  # the answer's quantile
    margin = 4 * math.sqrt(0.25 / m) + 1 / m
    lo = picked[max(0, math.floor((q - margin) * m))]
    hi = picked[min(m, math.ceil((q + margin) * m))]
    above = int((values > hi).sum())  # certainly larger than the answer
    candidates = values[(values >= lo) & (values <= hi)]
    if above < k <= above + candidates.numel():
        return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values
    return torch.kthvalue(values, n - k + 1).values


def sparsify(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x`` with the dropped entries zeroed: what backward sees (in x's dtype)."""
    return (x.reshape(-1) * keep_mask(x, gamma)).view_as(x)


def _pack(x: torch.Tensor, sap: SapConfig | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, positions) to save; ``sap=None`` saves the input itself and no positions."""
    if sap is None:
        return x, None
    x = x.detach()
    if sap_kernels.usable(x):  # one compiled pass to select and pack, one to compact
        index = sap.positions != "bitmap"
        kept = select(x, sap.gamma, lambda t: (c := sap_kernels.keep_bits(x, t), c.total))
        values, positions = kept.gathered(DTYPES[sap.value_dtype], index)
        return values, positions if index else kept.packed()
    keep = keep_mask(x, sap.gamma)
    idx = true_positions(keep)  # ascending: the values are in flat order
    values = x.reshape(-1).index_select(0, idx).to(DTYPES[sap.value_dtype])
    if sap.positions == "bitmap":
        return values, pack_bits(keep)
    return values, idx.to(torch.int32)


def _unpack(values: torch.Tensor, positions: torch.Tensor | None, sap: SapConfig | None,
            shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if sap is None:
        return values
    if sap.positions == "bitmap" and sap_kernels.handles(values.device, dtype):
        return sap_kernels.scatter(positions, values, math.prod(shape), dtype).view(shape)
    out = torch.zeros(math.prod(shape), dtype=dtype, device=values.device)
    index = true_positions(unpack_bits(positions, out.numel())) if sap.positions == "bitmap" else positions.long()
    out.index_copy_(0, index, values.to(dtype))
    return out.view(shape)


class _Conv2d(Function):
    """conv2d whose saved input is pruned; the weight may be ``weight_fn(weight, *wargs)`` (NSConv)."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, conv: tuple, sap, weight_fn, *wargs):
        stride, padding, dilation, groups = conv
        w = weight if weight_fn is None else weight_fn(weight, *wargs)
        out = torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)
        values, positions = _pack(x, sap)
        tensor_args = [a if isinstance(a, torch.Tensor) else None for a in wargs]
        ctx.save_for_backward(values, positions, weight, *tensor_args)
        ctx.meta = (x.shape, x.dtype, conv, sap, weight_fn, [None if t is not None else a
                                                             for a, t in zip(wargs, tensor_args)])
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out):
        shape, dtype, (stride, padding, dilation, groups), sap, weight_fn, plain = ctx.meta
        values, positions, weight, *tensor_args = ctx.saved_tensors
        wargs = [t if t is not None else a for t, a in zip(tensor_args, plain)]
        compute = grad_out.dtype  # the forward's dtype: lower than the input's under autocast
        x = _unpack(values, positions, sap, shape, dtype).to(compute)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_wargs = ctx.needs_input_grad[6:]
        w_graph = None
        if weight_fn is None:
            w = weight
        else:
            with torch.enable_grad():
                leaves = [weight.detach().requires_grad_(need_w)]
                leaves += [a.detach().requires_grad_(n) if isinstance(a, torch.Tensor) else a
                           for a, n in zip(wargs, need_wargs)]
                w_graph = weight_fn(*leaves)
            w = w_graph.detach()
        w = w.to(compute)
        any_w = need_w or any(need_wargs)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, w, ctx.bias_shape, list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [need_x, any_w, need_b and ctx.bias_shape is not None],
        )
        gx = None if gx is None else gx.to(dtype)
        gb = None if gb is None else gb.to(weight.dtype)
        if gw is not None:
            gw = gw.to(weight.dtype)
        grads_wargs = [None] * len(wargs)
        if weight_fn is not None and any_w:
            inputs = [(i, t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
            got = torch.autograd.grad(w_graph, [t for _, t in inputs], gw, allow_unused=True)
            gw = None
            for (i, _), g in zip(inputs, got):
                if i == 0:
                    gw = g
                else:
                    grads_wargs[i - 1] = g
        return (gx, gw if need_w else None, gb, None, None, None, *grads_wargs)


class _Linear(Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, sap):
        out = torch.nn.functional.linear(x, weight, bias)
        values, positions = _pack(x, sap)
        ctx.save_for_backward(values, positions, weight)
        ctx.meta = (x.shape, x.dtype, sap, bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out):
        shape, dtype, sap, has_bias = ctx.meta
        values, positions, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        compute = grad_out.dtype  # the forward's dtype: lower than the input's under autocast
        gx = (grad_out @ weight.to(compute)).to(dtype) if need_x else None
        gw = None
        if need_w:
            x = _unpack(values, positions, sap, shape, dtype).to(compute)
            gw = (g2.t() @ x.reshape(-1, shape[-1])).to(weight.dtype)
        gb = g2.sum(0).to(weight.dtype) if (need_b and has_bias) else None
        return gx, gw, gb, None


class _MaskedClamp(Function):
    """ReLU (max_val=None) or ReLU6 whose backward uses a packed 1-bit mask."""

    @staticmethod
    def forward(ctx: Any, x, max_val):
        if sap_kernels.usable(x):
            out, packed = sap_kernels.relu(x, max_val)
        else:
            out = x.clamp(0, max_val)
            packed = pack_bits(greater(x, 0.0) if max_val is None else between(x, 0.0, max_val))
        ctx.save_for_backward(packed)
        ctx.meta = x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out):
        (packed,) = ctx.saved_tensors
        if sap_kernels.usable(grad_out):
            return sap_kernels.mask_grad(grad_out, packed), None
        live = unpack_bits(packed, grad_out.numel()).view(ctx.meta)
        return masked(grad_out.contiguous(), live), None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int, sap: SapConfig | None, weight_fn: WeightFn | None = None, *wargs) -> torch.Tensor:
    """F.conv2d with SAP's saved input (``sap=None``: the input is saved whole)."""
    return _Conv2d.apply(x, weight, bias, (tuple(stride), tuple(padding), tuple(dilation), groups), sap,
                         weight_fn, *wargs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sap: SapConfig | None):
    return _Linear.apply(x, weight, bias, sap)


def relu_bitmask(x: torch.Tensor, max_val: float | None = None) -> torch.Tensor:
    return _MaskedClamp.apply(x, max_val)


# ---- modules -------------------------------------------------------------------------------------
def _active(module: nn.Module) -> bool:
    return module.sap is not None and module.training and torch.is_grad_enabled()


class SapConv2d(nn.Conv2d):
    """A Conv2d (same parameters and state dict) using :func:`conv2d` while training."""

    sap: SapConfig | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.sap)


class SapLinear(nn.Linear):
    sap: SapConfig | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self):
            return super().forward(x)
        return linear(x, self.weight, self.bias, self.sap)


class BitmaskReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_bitmask(x) if self.training and torch.is_grad_enabled() else super().forward(x)


class BitmaskReLU6(nn.ReLU6):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_bitmask(x, 6.0) if self.training and torch.is_grad_enabled() else super().forward(x)


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: SapConv2d, nn.Linear: SapLinear}
_RELU_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.ReLU: BitmaskReLU, nn.ReLU6: BitmaskReLU6}


def apply_sap(model: nn.Module, sap: SapConfig) -> nn.Module:
    """Convert ``model`` in place (and return it): every Conv2d/Linear prunes its saved input.

    Plain Conv2d/Linear (and, with ``relu_bitmask``, ReLU/ReLU6) change class to a subclass with the
    same parameters and state dict; layers that already know SAP (NSConv) just get the settings.
    Masks compose: masked weights stay zero (or NSConv multiplies its ``weight_mask``).
    """
    for module in model.modules():
        cls = _SWAPS.get(type(module))
        if cls is None and sap.relu_bitmask:
            cls = _RELU_SWAPS.get(type(module))
        if cls is not None:
            module.__class__ = cls
        if isinstance(module, (nn.Conv2d, nn.Linear)) and hasattr(module, "sap"):
            module.sap = sap
    return model
