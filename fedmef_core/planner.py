"""Memory planner: what one client step holds, predicted without running it, and how a client fits a budget.

:func:`predict` gives the parts :mod:`fedmef_core.memory` measures (a :class:`~fedmef_core.memory.MemoryReport`,
``peak_bytes`` None) of one local step at any batch size, SAP γ and SAP storage (a :class:`ClientStep`), from a
:class:`StepProfile` of the client's model traced once (:func:`profile_config`, cached per process):

- weights: :func:`fedmef_core.memory.weight_bytes` on the model's shapes (sparse at ``pruning.density``,
  int32 positions, as the accountant stores them);
- gradients: one dense gradient per parameter; optimizer: one momentum buffer per parameter when
  ``federation.momentum > 0``;
- activations: the trace runs the global model before round 1 (masks and SAP as a client runs them) forward
  on PROFILE_BATCH = 4 images and on 2 of them, under the accountant's own saved-tensor counter, and sorts
  what autograd saves into storages saved whole (BatchNorm inputs, pooling indices, ...), whose bytes are
  linear in the batch (a fixed and a per-sample part: shapes), the inputs of SAP layers (entries per sample,
  plus a sample of their magnitudes) and 1-bit ReLU masks (entries per sample). At a batch ``B`` a ReLU mask
  of ``n`` entries holds ``ceil(n / 8)`` bytes and a SAP layer its kept values and their positions
  (:func:`fedmef_core.sap.saved_input_bytes`).

How many entries SAP keeps is the one count that shapes alone do not give: k = n - floor(γ n) only when the
input has more than k non-zeros and no ties at the threshold. A ReLU'd input is about half zeros (at γ < 0.5
SAP keeps only those: 40% fewer bytes than k on MobileNetV2 at γ = 0.3), and a ReLU6 clamps many entries to
exactly 6 (ties: at γ = 0.8 it keeps 6% more than k). So the kept share of each layer is read off its profiled
magnitudes with SAP's own rule (:func:`fedmef_core.sap.kept_share`). Profiled on the config's training images,
the prediction is within 2% of the accountant on every architecture, method and SAP storage (the tests);
profiled on random images (``data=None``: nothing to load) SAP layers after data-dependent zeros are off by up to
~4% (MobileNetV2 with NSConv on Fashion-MNIST at γ = 0.5). A query is arithmetic on these counts (about a
millisecond); the trace costs one small forward pass.

:func:`fit` applies a budget in MiB to a client. The budget bounds the paper's footprint (weights as stored +
saved activations) by default, or with ``bound="total"`` everything (+ gradients and optimizer state). The
policies: ``exclude`` (the client trains as configured, or not at all), ``fit_batch`` (the largest batch up to
the configured one that fits, down to ``min_batch``), ``fit_gamma`` (SAP methods: the smallest γ from the
configured one up to ``max_gamma``, in steps of 0.01, that fits at the configured batch, else ``max_gamma`` and
the largest batch that fits; other methods: as ``fit_batch``), ``accumulate`` (the largest micro-batch that
fits, found as ``fit_batch`` finds a batch: the client keeps its batch and adds up the micro-batches' gradients, so
what it holds is a micro-batch's activations beside the same weights, gradients and optimizer state). When
nothing fits, the result says what the client would need: the step at ``min_batch`` (and ``max_gamma``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core.config import ExperimentConfig, SapConfig
from fedmef_core.data import ImageData, image_shape, iterate_batches
from fedmef_core.initial import initial_model
from fedmef_core.memory import ActivationCounter, MemoryReport, weight_bytes
from fedmef_core.sap import (
    BitmaskReLU,
    BitmaskReLU6,
    apply_sap,
    kept_share,
    packed_bytes,
    resolve_sap,
    saved_input_bytes,
)

MIB = 2**20
PROFILE_BATCH = 4  # samples of the one-off trace (and half of them: the fixed and per-sample bytes)
PROFILE_SAMPLE = 1 << 15  # input magnitudes kept per SAP layer (evenly spaced quantiles)
Bound = Literal["footprint", "total"]
Policy = Literal["exclude", "fit_batch", "fit_gamma", "accumulate"]
POLICIES: tuple[str, ...] = Policy.__args__
BOUNDS: tuple[str, ...] = Bound.__args__


@dataclass(frozen=True)
class ClientStep:
    """What a query varies: the batch size, SAP's γ and storage, the weights' density and the momentum."""

    density: float | None  # None: dense weights
    sap: SapConfig | None  # None: SAP off
    momentum: float
    batch_size: int

    @classmethod
    def of(cls, config: ExperimentConfig) -> ClientStep:
        """The step a client of a validated ``config`` trains (as :mod:`tasks.memory` accounts it)."""
        density = config.pruning.density
        return cls(density if density < 1 else None, resolve_sap(config), config.federation.momentum,
                   config.federation.batch_size)

    @property
    def gamma(self) -> float | None:
        return None if self.sap is None else self.sap.gamma

    def at(self, batch_size: int | None = None, gamma: float | None = None) -> ClientStep:
        """This step with another batch size and/or γ (γ only matters with SAP)."""
        sap = self.sap if gamma is None or self.sap is None else self.sap.model_copy(update={"gamma": gamma})
        return replace(self, batch_size=self.batch_size if batch_size is None else batch_size, sap=sap)


@dataclass(frozen=True, eq=False)
class StepProfile:
    """The one-off trace of a client's model: what :func:`predict` computes from."""

    model: nn.Module  # on the meta device: shapes only
    fixed_bytes: int  # storages saved whole whose size does not depend on the batch
    per_sample_bytes: int  # and the rest of the storages saved whole, per sample
    sap_layers: tuple[tuple[int, np.ndarray], ...]  # each SAP call: input entries per sample, |input| quantiles
    relu_masks: tuple[int, ...]  # entries per sample of each 1-bit ReLU call
    param_bytes: int
    buffer_bytes: int
    sap: bool  # traced with SAP on
    relu_bitmask: bool
    source: str  # "data" (the first training images) or "random" (standard normal inputs)
    _weights: dict[float | None, int] = field(default_factory=dict, repr=False)  # weight bytes by density

    def weight_bytes(self, density: float | None) -> int:
        """:func:`fedmef_core.memory.weight_bytes` of the model at ``density`` (remembered)."""
        if density not in self._weights:
            self._weights[density] = weight_bytes(self.model, density=density)
        return self._weights[density]


class _Recorder(ActivationCounter):
    """The accountant's counter, with SAP layers' and 1-bit ReLUs' own saves set aside as entry counts."""

    def __init__(self, model: nn.Module, batch: int):
        super().__init__(model)
        self.batch = batch
        self.counts: dict[str, list[int]] = {"sap": [], "relu": []}
        self.magnitudes: list[np.ndarray] = []  # ascending |input| of each SAP call
        self.running: dict[str, list] = {}  # layer -> [kind, its input, counted yet] while it runs
        for name, module in model.named_modules():
            kind = _kind(module)
            if kind is not None:
                self.handles.append(module.register_forward_pre_hook(self._enter(name, kind)))

    def _enter(self, name: str, kind: str):
        def hook(module, args):
            self.running[name] = [kind, args[0], False]

        return hook

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        call = self.running.get(self.stack[-1]) if self.stack else None
        ptr = t.untyped_storage().data_ptr()
        if call is None or ptr in self.exclude or ptr == call[1].untyped_storage().data_ptr():
            return super().pack(t)  # saved whole (a SAP layer that falls back to the plain op saves its input)
        kind, x, counted = call
        if not counted:
            self.counts[kind].append(x.numel() // self.batch)
            if kind == "sap":
                self.magnitudes.append(np.sort(x.detach().reshape(-1).abs().float().numpy()))
            call[2] = True
        return t


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (BitmaskReLU, BitmaskReLU6)):
        return "relu"
    if isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "sap", None) is not None:
        return "sap"
    return None


def _record(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> _Recorder:
    """A forward pass and loss under the recorder, as :func:`fedmef_core.memory.measure_step` runs them
    (backward saves nothing new, so it does not run)."""
    recorder = _Recorder(model, x.shape[0])
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            out = model(x)
            recorder.where = "(loss)"
            F.cross_entropy(out, y)
    finally:
        recorder.close()
    return recorder


def _quantiles(parts: list[np.ndarray]) -> np.ndarray:
    """At most PROFILE_SAMPLE evenly spaced quantiles of the joined ascending samples."""
    joined = np.sort(np.concatenate(parts))
    step = math.ceil(joined.size / PROFILE_SAMPLE)
    return joined[step // 2::step] if step > 1 else joined


def profile_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, source: str = "data") -> StepProfile:
    """Trace ``model`` (train mode, SAP applied if it runs SAP) on the batch ``(x, y)`` and on its first half."""
    model = model.train()
    half = x.shape[0] // 2
    if half < 1:
        raise ValueError("profile_step needs a batch of at least 2 samples")
    small = _record(model, x[:half].clone(), y[:half].clone())  # its own storage: a view counts all of x's
    large = _record(model, x, y)
    if small.counts != large.counts:
        raise RuntimeError(f"SAP layers saved differently at batches {half} and {x.shape[0]}")
    plain = [sum(r.by_layer.values()) for r in (small, large)]
    per_sample, rest = divmod(plain[1] - plain[0], x.shape[0] - half)
    if rest:
        raise RuntimeError(f"saved bytes are not linear in the batch ({plain} at {half} and {x.shape[0]})")
    sap = next((m.sap for m in model.modules() if _kind(m) == "sap"), None)
    return StepProfile(
        model=model.to("meta"),
        fixed_bytes=plain[0] - per_sample * half,
        per_sample_bytes=per_sample,
        sap_layers=tuple((n, _quantiles([a, b])) for n, a, b in zip(large.counts["sap"], small.magnitudes,
                                                                     large.magnitudes)),
        relu_masks=tuple(large.counts["relu"]),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        sap=sap is not None,
        relu_bitmask=bool(large.counts["relu"]),
        source=source,
    )


def profile_config(config: ExperimentConfig, data: ImageData | None = None) -> StepProfile:
    """The profile of ``config``'s clients: its global model before round 1 (masks included) on the first
    PROFILE_BATCH images of ``data`` (its training set), or on standard normal images when ``data`` is None.
    Cached per process: the batch size, γ, SAP storage and momentum are the queries' (:class:`ClientStep`)."""
    sap = config.sap
    key = config.model_copy(update={
        "federation": config.federation.model_copy(update={"batch_size": 1, "momentum": 0.0}),
        "sap": sap.model_copy(update={"gamma": 0.5, "value_dtype": "float32", "positions": "index"}),
        "tracking": None, "runtime": None, "ray": None,
    })
    return _profile(key, data)


@functools.lru_cache(maxsize=64)
def _profile(config: ExperimentConfig, data: ImageData | None) -> StepProfile:
    shape = image_shape(config.data) if data is None else data.shape
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        model, _, _ = initial_model(config, shape)
    sap = resolve_sap(config)
    if sap is not None:
        apply_sap(model, sap)
    if data is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(PROFILE_BATCH, shape[0], shape[1], shape[1], generator=gen)
        y = torch.randint(0, shape[2], (PROFILE_BATCH,), generator=gen)
    else:
        n = min(PROFILE_BATCH, len(data))
        x, y = next(iterate_batches(data, list(range(n)), n))
    return profile_step(model, x, y, "random" if data is None else "data")


def predict(profile: StepProfile, step: ClientStep) -> MemoryReport:
    """What one client step holds, by part (see the module doc); ``peak_bytes`` is None."""
    if step.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {step.batch_size}")
    relu_bitmask = step.sap is not None and step.sap.relu_bitmask
    if (step.sap is not None) != profile.sap or relu_bitmask != profile.relu_bitmask:
        raise ValueError("the step's SAP (on/off, relu_bitmask) differs from the profile's: profile it again")
    b = step.batch_size
    activations = profile.fixed_bytes + profile.per_sample_bytes * b
    for n, magnitudes in profile.sap_layers:
        entries = n * b
        activations += saved_input_bytes(entries, round(kept_share(magnitudes, entries, step.sap.gamma) * entries),
                                         step.sap)
    activations += sum(packed_bytes(n * b) for n in profile.relu_masks)
    return MemoryReport(
        weights_bytes=profile.weight_bytes(step.density),
        gradient_bytes=profile.param_bytes,
        optimizer_bytes=profile.param_bytes if step.momentum > 0 else 0,
        activation_bytes=activations,
        weights_dense_bytes=profile.param_bytes + profile.buffer_bytes,
        batch_size=b,
    )


# ---- fitting a budget ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """How a client with a budget trains: whether it fits, at which batch and γ, and the predicted parts."""

    fits: bool
    batch_size: int
    gamma: float | None  # None: no SAP
    budget_mib: float
    bound: Bound
    report: MemoryReport = field(repr=False)

    @property
    def bound_mib(self) -> float:
        """The bounded figure: footprint or total, in MiB."""
        return _bounded(self.report, self.bound) / MIB

    def parts_mib(self) -> dict[str, float]:
        """weights, gradients, optimizer, activations, footprint and total, in MiB."""
        r = self.report
        return {**{k: v / MIB for k, v in r.parts().items()}, "footprint": r.footprint_bytes / MIB,
                "total": r.total_bytes / MIB}


def _bounded(report: MemoryReport, bound: Bound) -> int:
    return report.footprint_bytes if bound == "footprint" else report.total_bytes


def fit(profile: StepProfile, step: ClientStep, budget_mib: float, policy: Policy = "fit_gamma", *,
        bound: Bound = "footprint", min_batch: int = 1, max_gamma: float = 0.95, gamma_step: float = 0.01) -> Fit:
    """Apply ``budget_mib`` to ``step`` with ``policy`` (module doc). γ moves in steps of ``gamma_step``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    if not 1 <= min_batch <= step.batch_size:
        raise ValueError(f"min_batch must be between 1 and the batch size {step.batch_size}, got {min_batch}")
    limit = budget_mib * MIB

    def result(s: ClientStep) -> Fit:
        report = predict(profile, s)
        return Fit(_bounded(report, bound) <= limit, s.batch_size, s.gamma, budget_mib, bound, report)

    configured = result(step)
    if configured.fits or policy == "exclude":
        return configured
    if policy == "fit_gamma" and step.sap is not None and step.sap.gamma < max_gamma:
        steps = int((max_gamma - step.sap.gamma) / gamma_step + 1e-9)
        gammas = [round(step.sap.gamma + i * gamma_step, 6) for i in range(1, steps + 1)]
        if not gammas or gammas[-1] < max_gamma:
            gammas.append(max_gamma)
        found = _first(gammas, lambda g: result(step.at(gamma=g)).fits)
        if found is not None:
            return result(step.at(gamma=found))
        step = step.at(gamma=max_gamma)
    batches = list(range(step.batch_size - 1, min_batch - 1, -1))  # largest first
    found = _first(batches, lambda b: result(step.at(batch_size=b)).fits)
    return result(step.at(batch_size=min_batch if found is None else found))


def _first(candidates: list, fits: Callable[[object], bool]):
    """The first candidate that fits, by bisection (fitting is monotone along the list), or None."""
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo] if lo < len(candidates) else None
