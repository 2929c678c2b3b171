"""A sweep's comparison: accuracy per method and density, paired differences against a reference method,
and the two figures (accuracy per round, accuracy versus memory footprint).

The accuracy compared is a cell's *score*: its mean test accuracy over the last N evaluated rounds
(``runtime.eval_mean_last``), not the last round's alone, which swings by several points from round to
round on a few thousand test images; the last round's stays in the table beside it.

Everything here is a small pure function of the cells' results (`CellResult`), so the maths is tested with
hand-made numbers. A *paired* difference pairs the cells of one seed: every seed shares the partition, the
client sampling and the initialisation seed across methods, so method − reference per seed removes the
seed's own luck; the interval is Student's t over seeds.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from matplotlib.figure import Figure
from scipy import stats

from fedmef_core.names import metric_key
from fedmef_core.plots import save_png

DENSE = 1.0  # the density a dense method runs at, whatever the grid says
MIB = 2**20


@dataclass(frozen=True)
class CellResult:
    """What one cell of a sweep produced. `density` is the grid's (a dense method's runs are shared)."""

    method: str
    density: float
    seed: int
    accuracy: float  # the final model's (the last round's)
    dense: bool = False
    mean_last: float | None = None  # mean test accuracy over the last `mean_rounds` evaluated rounds
    mean_rounds: int = 1
    footprint_bytes: int | None = None
    curve: tuple[tuple[int, float], ...] = ()  # (round, test accuracy)
    prune_drop: float | None = None  # mean over adjustment rounds, when the core logged it
    post_adjust_drop: float | None = None  # mean of acc(r-1) - acc(r) over adjustment rounds r > 1
    run_dir: str = ""
    mlflow_run_id: str = ""
    participation: float | None = None  # with device budgets: trained / sampled clients over the run
    tier_accuracy: tuple[tuple[str, float], ...] = ()  # the final model on each device tier's data
    budget: float | None = None  # a sweep's budget fraction of the dense footprint (None: no budget axis)

    @property
    def score(self) -> float:
        """What the comparison compares: the mean over the last rounds (the last round's when absent)."""
        return self.accuracy if self.mean_last is None else self.mean_last


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class SummaryRow:
    """Accuracy of one method at one density over seeds (a dense method: one row at 1.0): ``accuracies`` are
    the cells' scores (mean of the last rounds), ``last_round`` the final models' accuracies."""

    method: str
    density: float
    accuracies: tuple[float, ...]
    last_round: tuple[float, ...] = ()
    mean_rounds: int = 1
    footprint_mib: float | None = None
    prune_drop: float | None = None
    post_adjust_drop: float | None = None
    participation: float | None = None
    tier_accuracy: tuple[tuple[str, float], ...] = ()  # means over seeds
    budget: float | None = None  # the budget fraction of the dense footprint (None: no budget axis)
    mean: float = field(init=False)
    std: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", statistics.fmean(self.accuracies))
        object.__setattr__(self, "std", statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0)

    @property
    def last_round_mean(self) -> float | None:
        return statistics.fmean(self.last_round) if self.last_round else None


@dataclass(frozen=True)
class PairedRow:
    """method − reference at one density (and budget), paired by seed."""

    method: str
    reference: str
    density: float
    differences: tuple[float, ...]
    interval: Interval
    budget: float | None = None
    p_value: float = math.nan  # two-sided paired t-test of a mean difference of 0 (nan: fewer than 2 seeds)
    p_holm: float = math.nan  # Holm-adjusted over every row of the table: the family its claims are made in


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student-t interval; one value has no spread (low = high = nan)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval of no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_p_value(differences: Sequence[float]) -> float:
    """Two-sided p of a paired t-test that the mean difference is 0 (nan with fewer than 2 values; 0 or 1 when every
    difference is the same)."""
    n = len(differences)
    if n < 2:
        return math.nan
    sd = statistics.stdev(differences)
    if sd == 0:
        return 1.0 if statistics.fmean(differences) == 0 else 0.0
    t = statistics.fmean(differences) / (sd / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan ones stay nan and do not count): the smallest is
    multiplied by the family's size m, the next by m - 1, ..., each kept at least its predecessor's, at most 1."""
    order = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summary_rows(results: Sequence[CellResult]) -> list[SummaryRow]:
    """One row per (method, density, budget), seeds in order; a dense method's shared runs count once."""
    groups: dict[tuple[str, float, float | None], dict[int, CellResult]] = {}
    for r in results:
        key = (r.method, DENSE if r.dense else r.density, r.budget)
        groups.setdefault(key, {})[r.seed] = r
    rows = []
    for (method, density, budget), by_seed in sorted(
            groups.items(), key=lambda kv: (_order(results, kv[0][0]), kv[0][1], _budget_order(kv[0][2]))):
        cells = [by_seed[s] for s in sorted(by_seed)]
        footprint = _mean_or_none(c.footprint_bytes for c in cells)
        rows.append(SummaryRow(
            method, density, tuple(c.score for c in cells), tuple(c.accuracy for c in cells),
            mean_rounds=max(c.mean_rounds if c.mean_last is not None else 1 for c in cells),
            footprint_mib=None if footprint is None else footprint / MIB,
            prune_drop=_mean_or_none(c.prune_drop for c in cells),
            post_adjust_drop=_mean_or_none(c.post_adjust_drop for c in cells),
            participation=_mean_or_none(c.participation for c in cells),
            tier_accuracy=tuple((t, statistics.fmean(dict(c.tier_accuracy)[t] for c in cells))
                                for t, _ in cells[0].tier_accuracy if all(t in dict(c.tier_accuracy) for c in cells)),
            budget=budget,
        ))
    return rows


def _budget_order(budget: float | None) -> float:
    return math.inf if budget is None else budget


def paired_differences(results: Sequence[CellResult], reference: str, confidence: float = 0.95) -> list[PairedRow]:
    """For every grid density (and budget) and every other method: score − reference's score, per seed both ran."""
    acc = {(r.method, r.density, r.budget, r.seed): r.score for r in results}
    rows = []
    for density in sorted({r.density for r in results}):
        for budget in sorted({r.budget for r in results}, key=_budget_order):
            for method in _methods(results):
                if method == reference:
                    continue
                seeds = sorted(s for (m, d, b, s) in acc
                               if (m, d, b) == (method, density, budget) and (reference, d, b, s) in acc)
                if not seeds:
                    continue
                diffs = tuple(acc[method, density, budget, s] - acc[reference, density, budget, s] for s in seeds)
                rows.append(PairedRow(method, reference, density, diffs, t_interval(diffs, confidence), budget,
                                      paired_p_value(diffs)))
    adjusted = holm([r.p_value for r in rows])
    return [replace(r, p_holm=p) for r, p in zip(rows, adjusted)]


def _methods(results: Sequence[CellResult]) -> list[str]:
    """Methods in the order they first appear (the grid's order)."""
    return list(dict.fromkeys(r.method for r in results))


def _order(results: Sequence[CellResult], method: str) -> int:
    return _methods(results).index(method)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def comparison_markdown(rows: Sequence[SummaryRow], paired: Sequence[PairedRow], title: str = "") -> str:
    """The Markdown table: accuracy mean ± std per method and density, then the paired differences."""
    last = max((r.mean_rounds for r in rows), default=1)
    budgets = any(r.budget is not None for r in rows)

    def where(density: float, budget: float | None) -> str:  # the density cell, and the budget's with a budget axis
        return f"{density:g} | {_fmt(budget, 'g')}" if budgets else f"{density:g}"

    head = "density | budget (× dense footprint)" if budgets else "density"
    lines = [f"# {title or 'sweep comparison'}", "",
             f"| method | {head} | seeds | accuracy, last {last} rounds (mean ± std) | last round | footprint MiB "
             "| prune drop | post-adjust drop |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if budgets else "")]
    for r in rows:
        lines.append(f"| {r.method} | {where(r.density, r.budget)} | {len(r.accuracies)} | "
                     f"{r.mean:.4f} ± {r.std:.4f} | {_fmt(r.last_round_mean, '.4f')} | "
                     f"{_fmt(r.footprint_mib, '.3f')} | {_fmt(r.prune_drop, '+.4f')} | "
                     f"{_fmt(r.post_adjust_drop, '+.4f')} |")
    lines += _devices_markdown(rows)
    if paired:
        ref = paired[0].reference
        lines += ["", f"## Paired difference against {ref} (same seed: same partition, sampling and init seed)", "",
                  f"| method − {ref} (last {last} rounds) | {head} | seeds | mean difference | 95% t-interval "
                  f"| p | p, Holm over the {len(paired)} rows |",
                  "|---|---|---|---|---|---|---|" + ("---|" if budgets else "")]
        for p in paired:
            iv = p.interval
            ci = "-" if iv.n < 2 else f"[{iv.low:+.4f}, {iv.high:+.4f}]"
            lines.append(f"| {p.method} | {where(p.density, p.budget)} | {iv.n} | {iv.mean:+.4f} | {ci} | "
                         f"{_fmt(p.p_value, '.3g')} | {_fmt(p.p_holm, '.3g')} |")
    return "\n".join(lines) + "\n"


def _devices_markdown(rows: Sequence[SummaryRow]) -> list[str]:
    """With device budgets: who could train, and how well each final model serves each tier's data."""
    with_devices = [r for r in rows if r.participation is not None]
    if not with_devices:
        return []
    tiers = list(dict.fromkeys(t for r in with_devices for t, _ in r.tier_accuracy))
    lines = ["", "## Devices: participation and accuracy on each tier's data", "",
             "| method | density | participation | " + " | ".join(f"accuracy on {t}'s data" for t in tiers) + " |",
             "|---|---|---|" + "---|" * len(tiers)]
    for r in with_devices:
        acc = dict(r.tier_accuracy)
        lines.append(f"| {r.method} | {r.density:g} | {r.participation:.0%} | "
                     + " | ".join(_fmt(acc.get(t), ".4f") for t in tiers) + " |")
    return lines


def comparison_csv(rows: Sequence[SummaryRow], paired: Sequence[PairedRow]) -> str:
    """Both tables as one CSV: `kind` is `accuracy` (value = mean) or `paired` (value = mean difference)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "method", "reference", "density", "budget", "n", "value", "std", "ci_low", "ci_high",
                "footprint_mib", "prune_drop", "post_adjust_drop", "last_round", "p", "p_holm"])
    for r in rows:
        w.writerow(["accuracy", r.method, "", _csv(r.density), _csv(r.budget), len(r.accuracies), _csv(r.mean),
                    _csv(r.std), "", "", _csv(r.footprint_mib), _csv(r.prune_drop), _csv(r.post_adjust_drop),
                    _csv(r.last_round_mean), "", ""])
    for p in paired:
        iv = p.interval
        w.writerow(["paired", p.method, p.reference, _csv(p.density), _csv(p.budget), iv.n, _csv(iv.mean), "",
                    _csv(iv.low), _csv(iv.high), "", "", "", "", _csv(p.p_value), _csv(p.p_holm)])
    return buf.getvalue()


def _csv(value: float | None) -> str:
    """A number as Python's shortest round-trip text (a numpy float's repr would write `np.float64(…)`)."""
    return "" if value is None or math.isnan(value) else repr(float(value))


def summary_metrics(rows: Sequence[SummaryRow], paired: Sequence[PairedRow]) -> dict[str, float]:
    """Flat metrics for the sweep's parent run, e.g. `acc_mean/fedmef/d0.1`, `diff_mean/fedmef-fedtiny/d0.1`."""
    out: dict[str, float] = {}
    for r in rows:
        cell = (r.method, f"d{r.density:g}", *_budget_key(r.budget))
        out[metric_key("acc_mean", *cell)] = r.mean
        out[metric_key("acc_std", *cell)] = r.std
        if r.last_round_mean is not None:
            out[metric_key("acc_last_round", *cell)] = r.last_round_mean
    for p in paired:
        pair = (f"{p.method}-{p.reference}", f"d{p.density:g}", *_budget_key(p.budget))
        out[metric_key("diff_mean", *pair)] = p.interval.mean
        if p.interval.n > 1:
            out[metric_key("diff_ci_low", *pair)] = p.interval.low
            out[metric_key("diff_ci_high", *pair)] = p.interval.high
    return out


def _budget_key(budget: float | None) -> tuple[str, ...]:
    return () if budget is None else (f"b{budget:g}",)


CHAMPION = "champion"


def best_aliases(results: Sequence[CellResult]) -> dict[str, CellResult]:
    """The Model Registry aliases a sweep sets, by the comparison's metric (a cell's :attr:`CellResult.score`, its
    mean test accuracy over the last rounds, so one lucky final round does not pick the model):
    ``best-<method>`` -> each method's best cell, ``champion`` -> the best of all (a tie: the first in grid
    order)."""
    best: dict[str, CellResult] = {}
    for r in results:
        for alias in (f"best-{r.method}", CHAMPION):
            if alias not in best or r.score > best[alias].score:
                best[alias] = r
    champion = best.pop(CHAMPION, None)
    return best if champion is None else {**best, CHAMPION: champion}


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Mean accuracy per round over the seeds' curves (rounds that every curve has)."""
    common = set.intersection(*(set(r for r, _ in c) for c in curves)) if curves else set()
    rounds = sorted(common)
    by_round = [dict(c) for c in curves]
    return rounds, [statistics.fmean(c[r] for c in by_round) for r in rounds]


def plot_curves(results: Sequence[CellResult], path: str | Path, title: str = "") -> None:
    """Test accuracy per round, mean over seeds: one panel per grid density, every method a line
    (a dense method dashed, the same in every panel)."""
    densities = sorted({r.density for r in results})
    fig = Figure(figsize=(4.2 * len(densities), 3.6))
    axes = fig.subplots(1, len(densities), squeeze=False, sharey=True)[0]
    for ax, density in zip(axes, densities):
        for method in _methods(results):
            cells = [r for r in results if r.method == method and r.density == density and r.curve]
            if not cells:
                continue
            rounds, acc = mean_curve([c.curve for c in cells])
            ax.plot(rounds, acc, marker=".", linestyle="--" if cells[0].dense else "-", label=method)
        ax.set(xlabel="round", title=f"d = {density:g}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_png(fig, path)


def plot_accuracy_memory(rows: Sequence[SummaryRow], path: str | Path, title: str = "") -> None:
    """Final accuracy (mean ± std over seeds) against the measured client footprint, one marker per
    (method, density); points of one method are joined in density order."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for method in dict.fromkeys(r.method for r in rows):
        pts = sorted((r for r in rows if r.method == method and r.footprint_mib is not None), key=lambda r: r.density)
        if not pts:
            continue
        ax.errorbar([r.footprint_mib for r in pts], [r.mean for r in pts], yerr=[r.std for r in pts],
                    marker="o", capsize=3, label=method)
        for r in pts:
            ax.annotate(f"{r.density:g}", (r.footprint_mib, r.mean), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set(xlabel="client training footprint (MiB: weights + saved activations)",
           ylabel="test accuracy (mean of the last rounds)",
           title=title or "accuracy versus memory", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
