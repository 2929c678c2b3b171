"""Devices with memory budgets, on the server's side: which client has how much memory, and how each sampled
client trains within it.

- :func:`assign_devices` gives every client a budget (MiB) and a tier, from ``devices`` in the config: tiers
  with shares, drawn with the partition seed (counts by largest remainder, so 40% of 100 clients is 40), or a
  CSV trace ``client_id,memory_mib``. With ``correlate: labels`` the smallest devices get the clients whose
  data lean most on the first half of the classes, so the small devices hold a label mix of their own. The
  assignment has a digest: a checkpoint resumes only on the same one.
- :class:`Fleet` fits each distinct budget once with the planner (:func:`fedmef_core.planner.fit`: the
  configured policy, bound, ``min_batch`` and ``max_gamma``) and turns a round's sampled clients into a
  :class:`RoundPlan`: a :class:`~fedmef_core.budget.ClientPlan` for each client that trains, and the
  excluded. It also turns a round's outcome into ``devices/`` metrics and per-client rows, and says how well a
  model serves each tier's data (its per-class test accuracy weighted by the tier's label mix).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmef_core.budget import ClientPlan
from fedmef_core.config import MAX_BUDGET_MIB, DevicesConfig, ExperimentConfig
from fedmef_core.errors import UserError
from fedmef_core.io import read_text
from fedmef_core.names import metric_key, number_name
from fedmef_core.planner import ClientStep, Fit, StepProfile, fit

TRACE_COLUMNS = ("client_id", "memory_mib")
DRAW_STREAM = 0xDE7C  # the tiers' draw: its own stream of the partition seed
MAX_TRACE_TIERS = 8  # a trace with more distinct budgets is grouped into budget quartiles


class DeviceTraceError(UserError, ValueError):
    """The budget trace cannot be used; the message names the rows and the fix."""


@dataclass(frozen=True)
class Assignment:
    """Each client's budget (MiB) and tier; ``tiers`` in ascending budget order."""

    budgets_mib: tuple[float, ...]
    tier_of: tuple[str, ...]
    tiers: tuple[str, ...]

    def digest(self) -> str:
        blob = json.dumps([self.budgets_mib, self.tier_of], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def clients_of(self, tier: str) -> list[int]:
        return [c for c, t in enumerate(self.tier_of) if t == tier]

    def to_dict(self) -> dict:
        return {"digest": self.digest(), "tiers": list(self.tiers),
                "clients": [{"client_id": c, "tier": t, "memory_mib": b}
                            for c, (t, b) in enumerate(zip(self.tier_of, self.budgets_mib))]}


def assign_devices(devices: DevicesConfig, labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int,
                   seed: int) -> Assignment | None:
    """The clients' budgets (module doc); None when devices are unlimited (``profile: none``)."""
    if devices.profile == "none":
        return None
    n = len(parts)
    if devices.profile == "trace":
        budgets = read_trace(Path(devices.trace), n)
        return _from_budgets(budgets)
    rng = np.random.default_rng([seed, DRAW_STREAM])
    order = rng.permutation(n)
    if devices.correlate == "labels":
        low = np.array([np.mean(labels[p] < num_classes / 2) if len(p) else 0.0 for p in parts])
        order = order[np.argsort(-low[order], kind="stable")]  # most first-half data first; ties in drawn order
    tiers = sorted(devices.tiers, key=lambda t: t.memory_mib)
    counts = _largest_remainder([t.share for t in tiers], n)
    budget, tier_of = [0.0] * n, [""] * n
    start = 0
    for tier, count in zip(tiers, counts):
        for c in order[start:start + count]:
            budget[int(c)], tier_of[int(c)] = float(tier.memory_mib), tier.name
        start += count
    return Assignment(tuple(budget), tuple(tier_of), tuple(t.name for t in tiers if t.name in tier_of))


def _largest_remainder(shares: list[float], n: int) -> list[int]:
    raw = [s * n for s in shares]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def read_trace(path: Path, num_clients: int) -> list[float]:
    """Budgets by client from a CSV ``client_id,memory_mib`` naming each client 0..num_clients-1 once."""
    fix = f"give one row per client 0..{num_clients - 1} with a positive memory_mib"
    try:
        rows = list(csv.reader(io.StringIO(read_text(path, "devices.trace"), newline="")))
    except OSError as exc:
        raise DeviceTraceError(f"devices.trace: cannot read {path} ({exc.strerror or exc}); set devices.trace "
                               "to a CSV with header client_id,memory_mib") from None
    if not rows or tuple(c.strip() for c in rows[0]) != TRACE_COLUMNS:
        raise DeviceTraceError(f"devices.trace {path}: the header must be {','.join(TRACE_COLUMNS)}, got "
                               f"{','.join(rows[0]) if rows else '(empty file)'}")
    budgets: dict[int, float] = {}
    problems = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            client, mib = int(row[0]), float(row[1])
        except (ValueError, IndexError):
            problems.append(f"line {line} {','.join(row)!r} is not a client id and a number")
            continue
        if not 0 <= client < num_clients:
            problems.append(f"line {line}: client {client} does not exist (federation.num_clients is {num_clients})")
        elif client in budgets:
            problems.append(f"line {line}: client {client} is listed twice")
        elif not (math.isfinite(mib) and 0 < mib <= MAX_BUDGET_MIB):
            problems.append(f"line {line}: client {client} has budget {row[1].strip()} (must be a positive MiB, "
                            f"at most {MAX_BUDGET_MIB:.0f})")
        else:
            budgets[client] = mib
    missing = [c for c in range(num_clients) if c not in budgets]
    if missing and not problems:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(f"{len(missing)} clients have no budget ({shown})")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DeviceTraceError(f"devices.trace {path}: " + "; ".join(problems[:5]) + more + f"; {fix}")
    return [budgets[c] for c in range(num_clients)]


def _from_budgets(budgets: list[float]) -> Assignment:
    """Tiers of a trace: one per distinct budget, or budget quartiles when there are many."""
    distinct = sorted(set(budgets))
    if len(distinct) <= MAX_TRACE_TIERS:
        names = {b: f"{number_name(b)}mib" for b in distinct}  # exact: two budgets never share a tier
        tier_of = tuple(names[b] for b in budgets)
        return Assignment(tuple(budgets), tier_of, tuple(names[b] for b in distinct))
    edges = np.quantile(budgets, [0.25, 0.5, 0.75])
    tier_of = tuple(f"q{int(np.searchsorted(edges, b, side='left')) + 1}" for b in budgets)
    return Assignment(tuple(budgets), tier_of, tuple(sorted(set(tier_of))))


# ---- the server's fleet ----------------------------------------------------------------------------
@dataclass
class RoundPlan:
    """A round's sampled clients: those that train (with their plans) and those excluded."""

    sampled: list[int]
    plans: dict[int, ClientPlan] = field(default_factory=dict)
    excluded: list[int] = field(default_factory=list)

    @property
    def trained(self) -> list[int]:
        """The clients asked to train."""
        return sorted(self.plans) if self.plans or self.excluded else list(self.sampled)

    @classmethod
    def unlimited(cls, sampled: list[int]) -> RoundPlan:
        return cls(sampled=sampled)

    def wire(self) -> dict[int, dict]:
        """The plans as a broadcast carries them."""
        return {c: p.to_dict() for c, p in self.plans.items()}


class Fleet:
    """The clients' devices: their budgets and, per distinct budget, how a client of the run's config fits it."""

    def __init__(self, config: ExperimentConfig, assignment: Assignment, profile: StepProfile,
                 labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int):
        d = config.devices
        self.config, self.assignment = config, assignment
        step = ClientStep.of(config)
        self.fits: dict[float, Fit] = {  # by budget; each fitted to (1 - headroom) of it
            b: fit(profile, step, b * (1 - d.headroom), d.policy, bound=d.bound,
                   min_batch=min(d.min_batch, step.batch_size), max_gamma=max(d.max_gamma, step.gamma or 0.0))
            for b in sorted(set(assignment.budgets_mib))
        }
        self.label_mix = {t: _label_mix(labels, [parts[c] for c in assignment.clients_of(t)], num_classes)
                          for t in assignment.tiers}

    def fit_of(self, client: int) -> Fit:
        return self.fits[self.assignment.budgets_mib[client]]

    def plan(self, sampled: list[int]) -> RoundPlan:
        out = RoundPlan(sampled=list(sampled))
        for c in sampled:
            f = self.fit_of(c)
            if not f.fits:
                out.excluded.append(c)
                continue
            out.plans[c] = ClientPlan(tier=self.assignment.tier_of[c], budget_mib=self.assignment.budgets_mib[c],
                                      gamma=f.gamma, bound=f.bound, predicted_mib=f.bound_mib,
                                      enforce=self.config.devices.enforce, **self._batches(f))
        return out

    def _batches(self, f: Fit) -> dict[str, int | None]:
        """The batch a fit trains with: under ``accumulate`` the configured batch, in micro-batches of the fitted
        size when it is smaller."""
        configured = self.config.federation.batch_size
        if self.config.devices.policy == "accumulate" and f.batch_size < configured:
            return {"batch_size": configured, "micro_batch": f.batch_size}
        return {"batch_size": f.batch_size, "micro_batch": None}

    # ---- reporting ---------------------------------------------------------------------------
    def tier_table(self) -> list[dict]:
        """Per tier: its budget(s), clients, and how they train (the planner's fit)."""
        rows = []
        for t in self.assignment.tiers:
            clients = self.assignment.clients_of(t)
            budgets = sorted({self.assignment.budgets_mib[c] for c in clients})
            f = self.fits[budgets[0]]
            rows.append({"tier": t, "budget_mib": f"{budgets[0]:g}" if len(budgets) == 1 else
                         f"{budgets[0]:g}-{budgets[-1]:g}", "clients": len(clients), "fits": f.fits,
                         **self._batches(f), "gamma": f.gamma, "predicted_mib": round(f.bound_mib, 3),
                         "bound": f.bound})
        return rows

    def round_rows(self, rnd: int, plan: RoundPlan, arrived: Sequence[int], memory: dict[int, dict],
                   over_budget: Sequence[int]) -> list[dict]:
        """One row per sampled client: its tier, budget, what it was asked to do and what happened (trained,
        excluded by the plan, over budget while training, or dropped for another fault)."""
        rows = []
        for c in plan.sampled:
            p = plan.plans.get(c)
            status = ("excluded" if p is None else "over_budget" if c in over_budget else
                      "trained" if c in arrived else "dropped")
            held = memory.get(c, {}).get("held_mib")
            rows.append({"round": rnd, "client_id": c, "tier": self.assignment.tier_of[c],
                         "budget_mib": self.assignment.budgets_mib[c], "status": status,
                         "batch_size": p.batch_size if p else "", "micro_batch": p.micro_batch or "" if p else "",
                         "gamma": "" if p is None or p.gamma is None
                         else p.gamma, "predicted_mib": round(p.predicted_mib, 4) if p else "",
                         "held_mib": "" if held is None else round(held, 4)})
        return rows

    def round_metrics(self, rows: list[dict]) -> dict[str, float]:
        """``devices/`` metrics of one round from its :meth:`round_rows`: counts overall and per tier, the batch
        and γ used, and the largest measured hold against the budget."""
        out: dict[str, float] = {}
        for tier in (None, *self.assignment.tiers):
            mine = [r for r in rows if tier is None or r["tier"] == tier]
            where = ("devices",) if tier is None else ("devices", tier)
            out[metric_key(*where, "sampled")] = len(mine)
            for status in ("trained", "excluded", "over_budget"):
                out[metric_key(*where, status)] = sum(r["status"] == status for r in mine)
            if tier is None:
                continue
            trained = [r for r in mine if r["status"] == "trained"]
            if trained:
                out[metric_key(*where, "batch_size")] = float(np.mean([r["batch_size"] for r in trained]))
                gammas = [r["gamma"] for r in trained if r["gamma"] != ""]
                if gammas:
                    out[metric_key(*where, "gamma")] = float(np.mean(gammas))
            held = [r["held_mib"] for r in mine if r["held_mib"] != ""]
            if held:
                out[metric_key(*where, "held_mib")] = max(held)
                out[metric_key(*where, "held_share")] = max(r["held_mib"] / r["budget_mib"] for r in mine
                                                            if r["held_mib"] != "")  # of the budget
        return out

    def tier_accuracy(self, per_class_accuracy: Sequence[float]) -> dict[str, float]:
        """How well a model serves each tier's data: its per-class test accuracy weighted by the tier's label
        mix."""
        acc = np.asarray(per_class_accuracy, dtype=float)
        return {t: float(mix @ acc) for t, mix in self.label_mix.items()}


def _label_mix(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes)
    for p in parts:
        counts += np.bincount(labels[p], minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1)
