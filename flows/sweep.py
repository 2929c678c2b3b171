"""Sweep flow: methods x densities x seeds as one flow run, compared under one MLflow parent run.

    python -m flows.sweep --methods fedtiny fedmef --densities 0.05 0.1 --seeds 0 1 2 \\
        [--params FILE] [--set section.key=value ...] [--set fedmef:pruning.bae_lambda=1.0 ...] \\
        [--reference fedtiny] [--jobs N] [--name NAME] [--root runs]

Each cell is one experiment in its own run folder (`<root>/<run_name>`): partition (shared by the cells that
split the data the same way), `train`, evaluate — a child run of the sweep's parent run in MLflow. The parent
carries the comparison: `comparison.md`/`.csv` (accuracy mean ± std per method and density, paired differences
against the reference with a 95% t-interval over seeds), `curves.png` and `accuracy_memory.png`; the same table
is the flow run's Markdown artifact `sweep-comparison` and the parent run's description. In the Model Registry
the alias `best-<method>` of each registered model (`fedmef-<arch>`) then points at the version of that method's
best cell by test accuracy, and `champion` at the best of all. Re-running the same sweep skips the finished cells,
resumes half-done ones from their checkpoints and reuses the parent run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from fedmef_core.config import ConfigError, ExperimentConfig, TrackingConfig, parse_override
from fedmef_core.data import load_dataset
from fedmef_core.errors import UserError
from fedmef_core.io import write_json, write_text
from fedmef_core.planner import POLICIES
from fedmef_core.registry import METHODS
from flows.cli import fails_cleanly, finite_number
from flows.lifecycle import detach_temporary_server, exit_code, signals_interrupt
from flows.train import train
from services.comparison import (
    CellResult,
    comparison_csv,
    comparison_markdown,
    paired_differences,
    plot_accuracy_memory,
    plot_curves,
    summary_metrics,
    summary_rows,
)
from services.sweep import (
    Cell,
    SweepSpec,
    cell_result,
    child_tags,
    experiments,
    grid_digest,
    parent_params,
    parent_run,
    parse_spec,
    partition_done,
    partitions,
    pending_steps,
    plan_cells,
    sweep_name,
)
from services.tracking.logged_models import point_aliases
from services.tracking.tracker import Tracker, TrackingUnavailable
from tasks.evaluation import evaluate_model
from tasks.partitioning import partition_dataset
from tasks.preflight import check_folder


@task(name="sweep-cell", cache_policy=NO_CACHE, task_run_name="{name}")
def sweep_cell(config: ExperimentConfig, tags: dict[str, str], name: str) -> list[str]:
    """Train and evaluate one cell, or only what it still lacks; returns the steps it ran."""
    steps = pending_steps(config)
    if "train" in steps:
        train(config, tags)
    if "evaluate" in steps:
        evaluate_model(config)
    return steps


def run_cells(cells: list[Cell], tags: dict[str, str], jobs: int) -> dict[str, list[str]]:
    """Every cell, `jobs` at a time (one job runs them in the flow's own thread, where torch is fastest),
    with a line as each one finishes."""
    started, steps = time.monotonic(), {}

    def finished(cell: Cell, ran: list[str]) -> None:
        steps[cell.name] = ran
        print(f"sweep: {len(steps)}/{len(cells)} experiments done after {time.monotonic() - started:.0f}s "
              f"({cell.name}: {'+'.join(ran) if ran else 'already done'})", flush=True)

    if jobs == 1:
        for c in cells:
            finished(c, sweep_cell(c.config, tags, c.name))
    else:
        with ThreadPoolTaskRunner(max_workers=jobs) as runner:
            by_future = {runner.submit(sweep_cell, {"config": c.config, "tags": tags, "name": c.name}): c
                         for c in cells}
            for future in as_completed(list(by_future)):
                finished(by_future[future], future.result())
    return {c.name: steps[c.name] for c in cells}


def publish_comparison(results: list[CellResult], reference: str, title: str, out_dir: Path,
                       parent: Tracker) -> dict[str, Any]:
    """Write the tables and figures into `out_dir`, log them and the summary metrics on the parent run,
    and show the table on the flow run's page."""
    from prefect.artifacts import create_markdown_artifact

    rows, paired = summary_rows(results), paired_differences(results, reference)
    markdown = comparison_markdown(rows, paired, title=title)
    files = {"comparison.md": markdown, "comparison.csv": comparison_csv(rows, paired)}
    for name, text in files.items():
        write_text(out_dir / name, text)
    write_json(out_dir / "cells.json", [asdict(r) for r in results])
    plot_curves(results, out_dir / "curves.png", title=title)
    plot_accuracy_memory(rows, out_dir / "accuracy_memory.png", title=title)
    for name in [*files, "cells.json", "curves.png", "accuracy_memory.png"]:
        parent.log_artifact(out_dir / name, "comparison")
    parent.log_metrics(summary_metrics(rows, paired))
    parent.describe(markdown)
    create_markdown_artifact(markdown, key="sweep-comparison", description=f"sweep {title}")
    return {"markdown": markdown, "rows": [asdict(r) for r in rows], "paired": [asdict(p) for p in paired]}


@flow(name="sweep", log_prints=True)
@fails_cleanly
def sweep_flow(spec: SweepSpec = SweepSpec()) -> dict:
    """Train and evaluate every (method, density, budget, seed) of the grid and compare them in one MLflow parent
    run."""
    cells = plan_cells(spec)
    todo = experiments(cells)
    name = sweep_name(spec, cells)
    tracking = cells[0].config.tracking
    with parent_run(tracking, name, grid_digest(spec, cells), parent_params(spec)) as parent:
        for config in partitions(todo):
            if not partition_done(config):
                partition_dataset(config)
        print(f"sweep {name}: {len(cells)} cells, {len(todo)} distinct experiments, {spec.jobs} at a time")
        steps = run_cells(todo, child_tags(parent, name), spec.jobs)
        results = [cell_result(c) for c in cells]
        comparison = publish_comparison(results, spec.reference_method, name, Path(spec.root) / "sweeps" / name,
                                        parent)
        aliases = best_model_aliases(tracking, results) if parent.enabled else []
    print(comparison["markdown"])
    return {"name": name, "parent_run_id": parent.run_id or "", "steps": steps,
            "cells": [asdict(r) for r in results], "aliases": aliases, **comparison}


def best_model_aliases(tracking: TrackingConfig, results: list[CellResult]) -> list[dict[str, Any]]:
    """Point the registry's aliases at the sweep's best models (`best-<method>`, `champion`: see
    :func:`services.comparison.best_aliases`), one line each; a store that fails here is a warning (the sweep's
    results are all written)."""
    try:
        aliases = point_aliases(tracking, results)
    except TrackingUnavailable as exc:
        print(f"warning: no model aliases set: {exc}")
        return []
    for a in aliases:
        print(f"alias {a['model']}@{a['alias']} -> version {a['version']} ({a['method']} d={a['density']:g} "
              f"seed {a['seed']}, accuracy {a['accuracy']:.4f})")
    return aliases


def _overrides(texts: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`--set section.key=value` for every cell, `--set METHOD:section.key=value` for one method's cells."""
    shared: dict[str, Any] = {}
    per_method: dict[str, dict[str, Any]] = {}
    for text in texts:
        key, value = parse_override(text)
        method, sep, dotted = key.rpartition(":")
        (per_method.setdefault(method, {}) if sep else shared)[dotted] = value
    return shared, per_method


def spec_from_args(argv: list[str] | None, prog: str | None = None) -> SweepSpec:
    methods = METHODS.names()
    parser = argparse.ArgumentParser(prog=prog, description=sweep_flow.description)
    parser.add_argument("--methods", nargs="+", required=True, metavar="METHOD", help=f"of {', '.join(methods)}")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budgets", nargs="+", type=finite_number, default=None, metavar="FRACTION",
                        help="memory budgets as fractions of the dense model's footprint (e.g. 0.1 0.2 0.5 1); "
                             "every client of a cell has that budget")
    parser.add_argument("--policy", choices=POLICIES, default="accumulate",
                        help="how a client fits its budget (devices.policy), the same for every method (default "
                             "accumulate: every method keeps its batch and steps)")
    parser.add_argument("--params", default="params.yaml", help="experiment config (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD:]SECTION.KEY=VALUE",
                        help="override one value for every cell, or with METHOD: for that method's cells")
    parser.add_argument("--reference", default=None, help="paired differences against this method (default fedtiny)")
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at the same time (default 1)")
    parser.add_argument("--name", default=None, help="MLflow parent run name (default: sweep-<grid digest>)")
    parser.add_argument("--root", default="runs", help="folder of the run folders and partitions (default: runs)")
    args = parser.parse_args(argv)
    shared, per_method = _overrides(args.set)
    return parse_spec({"methods": args.methods, "densities": args.densities, "seeds": args.seeds,
                       "budgets": args.budgets, "policy": args.policy,
                       "reference": args.reference, "overrides": shared, "method_overrides": per_method,
                       "params": args.params, "name": args.name, "jobs": args.jobs, "root": args.root})


def preflight(spec: SweepSpec) -> None:
    """Every cell's config validates, the root can be written, the data loads and MLflow answers — before
    anything runs."""
    cells = plan_cells(spec)
    check_folder(Path(spec.root), "--root")
    for config in {c.config.data.model_dump_json(): c.config for c in cells}.values():
        load_dataset(config.data)
    Tracker(cells[0].config.tracking).check_reachable()


def run(spec: SweepSpec) -> dict:
    preflight(spec)
    detach_temporary_server()
    with signals_interrupt():
        return sweep_flow(spec)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """The CLI: user errors (bad --set, unknown method, missing data) are one line and exit status 2."""
    try:
        return run(spec_from_args(argv, prog))
    except (UserError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, TerminationSignal) as exc:
        print("interrupted: finished cells and checkpoints are kept; run the same sweep again to resume",
              file=sys.stderr)
        sys.exit(exit_code(exc))


if __name__ == "__main__":
    main()
