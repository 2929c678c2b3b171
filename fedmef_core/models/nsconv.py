"""Normalized sparse convolution (NSConv): FedMef's weight-standardized conv that replaces BatchNorm.

    W_hat = g * (W - mean(W)) / sqrt(max(var(W) * fan_in, eps))  (* mask)

mean and (biased) variance per output channel over its fan-in (in_channels/groups x kh x kw), ``g`` a
learned per-channel gain. So each channel of W_hat (unmasked) has zero mean and variance g^2 / fan_in. A sparse
layer takes the mean, the variance and the count over the weights its mask keeps (:func:`standardize`), so
its kept W_hat are centred too; grown weights enter at their channel's mean (:func:`grow_at_channel_mean`).
The gain starts at ``GAIN_INIT`` = sqrt(2 / (1 - 1/pi)) ~ 1.71 (the ReLU gain of Brock et al.'s
scaled weight standardisation), not 1: with sum(W_hat^2) = g^2 per channel, a ReLU'd unit Gaussian
input (variance (1 - 1/pi) / 2) leaves the conv with unit variance, so the signal does not shrink layer
by layer as it does with g = 1 (no BatchNorm rescales it); on short FedMef runs this closes the gap to
BatchNorm (README). A model built with ``model.norm: nsconv`` has no BatchNorm at all: the norm slot
is ``nn.Identity`` and every Conv2d becomes an NSConv with a bias (init 0) that takes over the removed
BatchNorm's shift.

Masks: the pruning code may set ``conv.weight_mask`` (a 0/1 tensor shaped like the weight, default
None); the standardized weight is multiplied by it. The weight is standardized inside the conv's
autograd function and recomputed in backward, so no weight-sized intermediate is saved for backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from numba import njit
from torch import nn
from torch.autograd import Function

from fedmef_core import sap as sap_fn
from fedmef_core.config import SapConfig

EPS = 1e-5
MIN_CENTRED = 3  # a sparse channel with fewer active weights is not centred (active_mean)
GAIN_INIT = math.sqrt(2 / (1 - 1 / math.pi))  # unit output variance after a ReLU'd unit Gaussian input


def standardize(weight: torch.Tensor, gain: torch.Tensor, mask: torch.Tensor | None = None,
                eps: float = EPS) -> torch.Tensor:
    """The NSConv weight W_hat (differentiable in ``weight`` and ``gain``).

    Dense: mean and variance per output channel over its whole fan-in. Sparse (``mask`` given): over the
    weights the mask keeps, so the active weights of every channel are centred and scaled whatever their
    count (a pruned zero is not a weight of the channel); see :func:`active_mean` for the few-weights guard.
    A sparse contiguous CPU float32/float64 weight takes :class:`_SparseStandardize` (the same bits, fewer
    passes); :func:`standardize_reference` is the plain autograd form.
    """
    if mask is not None and _fused(weight, gain):
        return _SparseStandardize.apply(weight, gain, mask, eps)
    return standardize_reference(weight, gain, mask, eps)


def standardize_reference(weight: torch.Tensor, gain: torch.Tensor, mask: torch.Tensor | None = None,
                          eps: float = EPS) -> torch.Tensor:
    """:func:`standardize` as torch ops, differentiated by autograd."""
    flat = weight.flatten(1)
    if mask is None:
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        scale = gain.view(-1, 1) * torch.rsqrt(torch.clamp(var * flat.shape[1], min=eps))
        return ((flat - mean) * scale).view_as(weight)
    keep = mask.flatten(1).to(flat.dtype)
    dev = (flat - active_mean(flat, keep)) * keep
    return (dev * _scale_of((dev * dev).sum(1, keepdim=True), gain, eps)).view_as(weight)


def active_mean(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row of ``flat`` (out_channels x fan_in), the mean of the entries ``keep`` (0/1) holds; 0 for a row
    with fewer than ``MIN_CENTRED`` of them. Guard: centring one active weight would zero it (and two would
    leave only their signs), so such a channel is scaled by its root sum of squares without centring."""
    return _mean_of((flat * keep).sum(1, keepdim=True), keep.sum(1, keepdim=True))


def _mean_of(s: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """:func:`active_mean` from the row sums ``s`` and counts."""
    mean = s / count.clamp(min=1)
    return torch.where(count >= MIN_CENTRED, mean, torch.zeros_like(mean))


def _scale_of(ss: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """The per-channel factor of the sparse standardisation, from the rows' sums of squared deviations."""
    return gain.view(-1, 1) * torch.rsqrt(torch.clamp(ss, min=eps))


# ---- the sparse standardisation in fewer passes -------------------------------------------------------
# Autograd's form makes ~20 weight-sized passes a step (forward, its recomputation in SAP's backward, and
# the backward of ten ops, each allocating). _SparseStandardize computes the same floats: the reductions are
# torch's own sums over the same tensors, the per-channel ops run through autograd on (C, 1) tensors, and
# only the elementwise chains are fused (compiled, no fast-math: each op rounds as torch's does); the
# gradient of ``dev`` adds its three parts in autograd's order. Tests compare it bit for bit.
def _fused(weight: torch.Tensor, gain: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and gain.dtype == weight.dtype and weight.is_contiguous() and weight.dim() >= 2)


@njit(nogil=True, cache=True)
def _centred(flat, mean, keep, out):  # pragma: no cover - compiled
    """out = (flat - mean) * keep, mean per row."""
    for i in range(flat.shape[0]):
        m = mean[i, 0]
        for j in range(flat.shape[1]):
            out[i, j] = (flat[i, j] - m) * keep[i, j]


@njit(nogil=True, cache=True)
def _dev_grad(grad, scale, grad_ss, dev, keep, out):  # pragma: no cover - compiled
    """out = ((grad * scale + grad_ss * dev) + grad_ss * dev) * keep: the gradient of ``flat - mean``."""
    for i in range(grad.shape[0]):
        sc, gs = scale[i, 0], grad_ss[i, 0]
        for j in range(grad.shape[1]):
            part = gs * dev[i, j]
            out[i, j] = ((grad[i, j] * sc + part) + part) * keep[i, j]


@njit(nogil=True, cache=True)
def _flat_grad(grad_diff, grad_s, keep, out):  # pragma: no cover - compiled
    """out = grad_diff + grad_s * keep, grad_s per row."""
    for i in range(grad_diff.shape[0]):
        gs = grad_s[i, 0]
        for j in range(grad_diff.shape[1]):
            out[i, j] = grad_diff[i, j] + gs * keep[i, j]


def _np(t: torch.Tensor):
    return t.detach().numpy()


class _SparseStandardize(Function):
    @staticmethod
    def forward(ctx, weight, gain, mask, eps):
        flat = weight.detach().flatten(1)
        keep = mask.flatten(1).to(flat.dtype).contiguous()
        count = keep.sum(1, keepdim=True)
        s = (flat * keep).sum(1, keepdim=True)
        dev = torch.empty_like(flat)
        _centred(_np(flat), _np(_mean_of(s, count)), _np(keep), _np(dev))
        ss = (dev * dev).sum(1, keepdim=True)
        ctx.save_for_backward(dev, keep, count, s, ss, gain)
        ctx.eps = eps
        return (dev * _scale_of(ss, gain.detach(), eps)).view_as(weight)

    @staticmethod
    def backward(ctx, grad_out):
        dev, keep, count, s, ss, gain = ctx.saved_tensors
        grad = grad_out.reshape(dev.shape).contiguous()
        with torch.enable_grad():  # the per-channel ops, differentiated by autograd as in the reference
            ss_leaf = ss.detach().requires_grad_(True)
            gain_leaf = gain.detach().requires_grad_(ctx.needs_input_grad[1])
            scale = _scale_of(ss_leaf, gain_leaf, ctx.eps)
        wanted = [ss_leaf, gain_leaf] if ctx.needs_input_grad[1] else [ss_leaf]
        grad_ss, *grad_gain = torch.autograd.grad(scale, wanted, (grad * dev).sum(1, keepdim=True))
        grad_diff = torch.empty_like(dev)
        _dev_grad(_np(grad), _np(scale), _np(grad_ss), _np(dev), _np(keep), _np(grad_diff))
        with torch.enable_grad():
            s_leaf = s.detach().requires_grad_(True)
            mean = _mean_of(s_leaf, count)
        (grad_s,) = torch.autograd.grad(mean, [s_leaf], -grad_diff.sum(1, keepdim=True))
        grad_weight = torch.empty_like(dev)
        _flat_grad(_np(grad_diff), _np(grad_s), _np(keep), _np(grad_weight))
        return grad_weight.view(grad_out.shape), (grad_gain[0] if grad_gain else None), None, None


class NSConv(nn.Conv2d):
    """A Conv2d whose effective weight is :func:`standardize` (``weight`` stays the prunable tensor)."""

    sap: SapConfig | None = None

    def __init__(self, *args, eps: float = EPS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.gain = nn.Parameter(torch.full((self.out_channels,), GAIN_INIT, **factory))
        self.weight_mask: torch.Tensor | None = None
        self.record_effective_grad = False  # set by recording_effective_grads
        self.effective_grad: torch.Tensor | None = None

    def standardized_weight(self) -> torch.Tensor:
        return standardize(self.weight, self.gain, self._mask(), self.eps)

    def _mask(self) -> torch.Tensor | None:
        m = self.weight_mask
        return None if m is None else m.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record_effective_grad and torch.is_grad_enabled():
            return self._recording_forward(x)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(x, self.standardized_weight(), self.bias)
        if not torch.is_grad_enabled():
            return nn.functional.conv2d(x, self.standardized_weight(), self.bias, self.stride,
                                        self.padding, self.dilation, self.groups)
        sap = self.sap if self.training else None
        return sap_fn.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                             sap, standardize, self.gain, self._mask(), self.eps)

    def _recording_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same conv with W_hat a tensor of the outer graph, whose gradient is kept in ``effective_grad``."""
        w_hat = self.standardized_weight()
        w_hat.register_hook(self._keep_effective_grad)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(x, w_hat, self.bias)
        sap = self.sap if self.training else None
        return sap_fn.conv2d(x, w_hat, self.bias, self.stride, self.padding, self.dilation, self.groups, sap)

    def _keep_effective_grad(self, grad: torch.Tensor) -> None:
        self.effective_grad = grad.detach()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bias: bool = True) -> NSConv:
        """An NSConv with ``conv``'s shape and weight (a bias is added, zero, unless ``bias=False``)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, bias=bias or conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new = new.to_empty(device=conv.weight.device)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            new.gain.fill_(GAIN_INIT)
            if new.bias is not None:
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
                else:
                    new.bias.zero_()
        new.train(conv.training)
        return new


def convert_to_nsconv(model: nn.Module) -> nn.Module:
    """Replace every Conv2d of ``model`` (in place) by an :class:`NSConv` with the same weight."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, NSConv.from_conv(child))
    return model


def _named_nsconvs(model: nn.Module) -> Iterator[tuple[str, NSConv]]:
    """(``"<module>.weight"``, layer) for every NSConv of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, NSConv):
            yield (f"{name}.weight" if name else "weight"), module


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> int:
    """Give every NSConv its mask from ``{"<module>.weight": 0/1 tensor}`` (None clears them all).

    Zeroing a weight is not enough for an NSConv (standardization shifts zeros), so the pruning code
    calls this wherever it applies masks. Returns the number of NSConv layers that got a mask.
    """
    count = 0
    for key, conv in _named_nsconvs(model):
        conv.weight_mask = None if masks is None else masks.get(key)
        count += conv.weight_mask is not None
    return count


def centre_active(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Shift every NSConv channel's kept raw weights to zero mean (in place; W_hat is unchanged, it does not
    see a per-channel shift). Called once on the initial sparse model: from then on a raw weight's
    magnitude is its distance from the channel's mean, which is what magnitude pruning and BaE's pull
    towards 0 mean for W_hat, and the mean stays near 0 (the gradient through the standardisation sums to
    zero over each channel's active weights, pruning removes weights near 0 and growth adds them at the
    mean)."""
    with torch.no_grad():
        for key, conv in _named_nsconvs(model):
            if key in masks:
                keep = masks[key].to(conv.weight.device).flatten(1).to(conv.weight.dtype)
                flat = conv.weight.flatten(1)
                flat.copy_((flat - active_mean(flat, keep)) * keep)


def grow_at_channel_mean(model: nn.Module, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
    """Give every weight that ``new`` activates and ``old`` did not (a grown weight) the mean of its channel's
    kept weights (in place on the raw weights). Adding a weight at its channel's active mean moves neither
    the mean nor the sum of squared deviations, so the grown weight enters with W_hat = 0 and the channel's
    other W_hat are unchanged: growth starts from the function the pruned model computes, as a grown 0 does
    in a plain conv. Layers that are not NSConv keep their grown weights at 0."""
    with torch.no_grad():
        for key, conv in _named_nsconvs(model):
            if key not in new or key not in old:
                continue
            was, now = old[key].to(conv.weight.device).bool(), new[key].to(conv.weight.device).bool()
            grown = (now & ~was).flatten(1)
            if not grown.any():
                continue
            flat = conv.weight.flatten(1)
            mean = active_mean(flat, (now & was).flatten(1).to(flat.dtype))
            flat.copy_(torch.where(grown, mean.expand_as(flat), flat))


def record_effective_grads(model: nn.Module, enabled: bool) -> None:
    """Switch every NSConv of ``model`` into (or out of) recording ``dL/dW_hat``; clears what was kept."""
    for _, conv in _named_nsconvs(model):
        conv.record_effective_grad = enabled
        conv.effective_grad = None


@contextmanager
def recording_effective_grads(model: nn.Module) -> Iterator[None]:
    """Within the block, each backward leaves ``dL/dW_hat`` of every NSConv for :func:`effective_grads`."""
    record_effective_grads(model, True)
    try:
        yield
    finally:
        record_effective_grads(model, False)


def effective_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": dL/dW_hat}`` of the last backward, for every NSConv that recorded one."""
    return {k: conv.effective_grad for k, conv in _named_nsconvs(model) if conv.effective_grad is not None}
