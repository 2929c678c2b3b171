"""The memory–accuracy frontier: which method trains the best model under a given memory budget, and at what cost.

Two sweeps (`flows.sweep --budgets`) over methods × budgets × seeds, the same grid, one normalisation each:

- ``paper``: every method with its paper's normalisation (``model.norm: auto``: NSConv for FedMef, BatchNorm for
  the baselines), as the papers compare them;
- ``nsconv``: every method with NSConv, norm-matched to FedMef, so a difference is the method's, not the norm's.

Budgets are fractions of dense FedAvg's footprint at the configured batch (the planner's figure for one client
step: weights + saved activations), never placed between methods; every client of a cell has the cell's budget.
Every method fits it by one rule stated before any run, ``--policy`` (default ``accumulate``: each method keeps its
batch and its steps and trains in micro-batches where the batch does not fit; BatchNorm then normalises each
micro-batch on its own). Costs are charged beside accuracy: seconds, local steps, samples and bytes per round.

The primary metric, declared before running: test accuracy on the configured test set (``data.test_limit``;
null = all 10,000 images) averaged over the last 5 evaluated rounds. Differences are FedMef minus every other
(method, norm) at each budget, paired by seed (same partition, sampling and initialisation), with a 95%
t-interval and a Holm-adjusted p over the whole family of differences reported.

    python -m bench.frontier --quick                  # a small grid: minutes on 2 CPU cores
    python -m bench.frontier --seeds 10               # the README's claim (hours: run it in sittings)

A killed frontier resumes: each cell is a sweep cell (its own run folder; a finished cell is not trained again).
Writes ``bench/results/frontier.json`` (``cells``: one row per cell; ``differences``) and
``bench/results/frontier.png`` (accuracy vs budget, mean and 95% interval over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.accuracy import COMMON, MEDIUM, QUICK, flat
from fedmef_core.checkpoint import FINAL_NAME, load_checkpoint
from fedmef_core.config import parse_override
from fedmef_core.runs import read_run_facts, run_paths
from flows.sweep import run as run_sweep
from services.comparison import CellResult, paired_differences, t_interval
from services.sweep import Cell, parse_spec, plan_cells

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["fedavg", "feddst", "fedtiny", "fedmef"]
BUDGETS = [0.1, 0.2, 0.35, 0.5, 1.0]
ARMS = {"paper": "auto", "nsconv": "nsconv"}  # model.norm of each arm
TARGET = "fedmef"
SETTINGS = {"quick": {**QUICK, "data": {**QUICK["data"], "test_limit": None}},
            "medium": {**MEDIUM, "data": {**MEDIUM["data"], "test_limit": None}}}


def spec_of(args: argparse.Namespace, arm: str):
    """The sweep of one arm."""
    overrides = {**flat(COMMON), **flat(SETTINGS[args.setting]), "tracking.experiment": "bench-frontier",
                 "runtime.eval_mean_last": 5}
    if ARMS[arm] != "auto":
        overrides["model.norm"] = ARMS[arm]
    overrides.update(parse_override(text) for text in args.set)
    return parse_spec({"params": str(args.params), "methods": args.methods, "densities": [args.density],
                       "seeds": list(range(args.seeds)),
                       "budgets": args.budgets, "policy": args.policy, "overrides": overrides,
                       "reference": args.methods[0], "jobs": args.jobs, "root": str(args.root),
                       "name": f"frontier-{args.setting}-{arm}"})


def frontier_cell(cell: Cell, arm: str) -> dict:
    """One cell's row: what it was, its accuracy, who trained and what a round cost."""
    paths = run_paths(cell.config)
    history = load_checkpoint(paths.checkpoints / FINAL_NAME)["history"]
    facts = read_run_facts(paths, cell.config, finished=True) or {}
    devices = json.loads((paths.metrics / "devices.json").read_text())
    evaluated = [h["accuracy"] for h in history if "accuracy" in h]
    rounds = [h for h in history if h.get("clients")]

    def per_round(key: str) -> float:
        return statistics.fmean(h.get(key, 0) for h in history) if history else 0.0

    return {
        "method": cell.method, "arm": arm, "norm": cell.config.model.norm, "policy": cell.config.devices.policy,
        "budget_fraction": cell.budget, "budget_mib": cell.config.devices.tiers[0].memory_mib, "seed": cell.seed,
        "accuracy_mean_last5": statistics.fmean(evaluated[-5:]), "accuracy_last": evaluated[-1],
        "participation": devices["participation"],
        "seconds_per_round": facts.get("seconds_per_round"),
        "steps_per_round": per_round("local_steps"), "samples_per_round": per_round("local_samples"),
        "bytes_per_round": per_round("comm/upload_bytes") + per_round("comm/download_bytes"),
        "rounds_trained": len(rounds), "run_dir": str(paths.root),
    }


def differences(cells: list[dict], target: str = TARGET) -> list[dict]:
    """`target` (its paper arm: FedMef as the paper runs it) minus every other (method, arm), per budget, paired by
    seed, Holm over all of them: the sweep's own paired comparison (method − reference, per density and budget),
    with each (method, arm) as one method and the sign turned so the target comes first."""
    arm_of = {f"{c['method']}/{c['arm']}": (c["method"], c["arm"]) for c in cells}
    results = [CellResult(f"{c['method']}/{c['arm']}", 0.0, c["seed"], c["accuracy_last"],
                          mean_last=c["accuracy_mean_last5"], budget=c["budget_fraction"]) for c in cells]
    rows = []
    for row in paired_differences(results, reference=f"{target}/paper"):
        method, arm = arm_of[row.method]
        iv = row.interval
        rows.append({"target": target, "method": method, "arm": arm, "budget_fraction": row.budget, "n": iv.n,
                     "mean": -iv.mean, "low": -iv.high, "high": -iv.low, "p": row.p_value, "p_holm": row.p_holm,
                     "differences": [-d for d in row.differences]})
    return rows


def plot(cells: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, arm in dict.fromkeys((c["method"], c["arm"]) for c in cells):
        mine = [c for c in cells if (c["method"], c["arm"]) == (method, arm)]
        budgets = sorted({c["budget_fraction"] for c in mine})
        ivs = [t_interval([c["accuracy_mean_last5"] for c in mine if c["budget_fraction"] == b]) for b in budgets]
        err = [[0 if iv.n < 2 else iv.mean - iv.low for iv in ivs],
               [0 if iv.n < 2 else iv.high - iv.mean for iv in ivs]]
        ax.errorbar(budgets, [iv.mean for iv in ivs], yerr=err, marker="o", capsize=3,
                    linestyle="-" if arm == "paper" else "--", label=f"{method} ({arm})")
    ax.set(xlabel="memory budget (× dense FedAvg's footprint)", ylabel="test accuracy, mean of last 5 rounds",
           title=title, xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (8 rounds) instead of 30 rounds")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--density", type=float, default=0.1, help="the sparse methods' density (default 0.1)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--policy", default="accumulate", help="devices.policy of every method (default accumulate)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--root", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=RESULTS / "frontier.json")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the config every cell starts from")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one value of every cell, after the setting's (repeatable)")
    args = parser.parse_args(argv)
    args.setting = "quick" if args.quick else "medium"
    started, cells = time.perf_counter(), []
    for arm in args.arms:
        spec = spec_of(args, arm)
        run_sweep(spec)
        cells += [frontier_cell(c, arm) for c in plan_cells(spec)]
    result = {"setting": args.setting, "metric": "test accuracy, mean of the last 5 evaluated rounds",
              "seconds": time.perf_counter() - started, "cells": cells, "differences": differences(cells)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(cells, args.out.with_suffix(".png"), f"Fashion-MNIST, Dirichlet(0.5), {args.setting}, d={args.density:g}")
    for d in result["differences"]:
        print(f"{d['target']} - {d['method']:>8} ({d['arm']:>6}) at {d['budget_fraction']:<5g}: {d['mean']:+.4f} "
              f"[{d['low']:+.4f}, {d['high']:+.4f}] Holm p {d['p_holm']:.3g} (n={d['n']})")
    print(f"{len(cells)} cells in {result['seconds']:.0f}s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
