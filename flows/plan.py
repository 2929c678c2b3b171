"""Plan clients for a memory budget: `python -m flows.plan --arch resnet18 --budget 128 [--method M ...] [--json]`.

For each method (default: every registered one) it says whether a client with ``--budget`` MiB trains, at
which batch size and SAP γ (:func:`fedmef_core.planner.fit`, policy ``--policy``), and what one step then
holds, by part (predicted by :mod:`fedmef_core.planner` from one small trace on the config's first training
images, or with ``--no-data`` on random ones); a client that cannot train gets what it
would need (the footprint at ``--min-batch`` and, with SAP, ``--max-gamma``). ``--measure`` runs that step
once on the config's data and prints the measured footprint beside the prediction (:mod:`tasks.memory`).
The experiment is ``--params`` with ``--set`` overrides, as for every flow; ``--arch``, ``--method`` and
``--batch-size`` set ``model.arch``, ``pruning.method`` and ``federation.batch_size``. User mistakes print
one line and exit 2. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedmef_core.config import ExperimentConfig, load_config, parse_override
from fedmef_core.data import DatasetUnavailable, load_dataset
from fedmef_core.errors import UserError
from fedmef_core.planner import BOUNDS, MIB, POLICIES, ClientStep, Fit, fit, profile_config
from fedmef_core.registry import ARCHITECTURES, METHODS
from flows.cli import finite_number

PARTS = ("weights", "activations", "gradients", "optimizer")


class PlanError(UserError, ValueError):
    """A mistake on the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise PlanError(f"{message} (see python -m flows.plan --help)")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES), help="model.arch")
    parser.add_argument("--budget", required=True, type=finite_number, metavar="MIB",
                        help="memory budget of a client, MiB")
    parser.add_argument("--method", nargs="+", choices=METHODS.names(), default=list(METHODS.names()), metavar="METHOD",
                        help=f"methods to plan (default: all of {', '.join(METHODS.names())})")
    parser.add_argument("--batch-size", type=int, default=None, help="federation.batch_size (default: the config's)")
    parser.add_argument("--policy", choices=POLICIES, default="fit_gamma",
                        help="exclude | fit_batch | fit_gamma (default)")
    parser.add_argument("--bound", choices=BOUNDS, default="footprint",
                        help="what the budget bounds: footprint (weights + saved activations, default) or total "
                             "(+ gradients and optimizer state)")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch a client may train with (default 1)")
    parser.add_argument("--max-gamma", type=finite_number, default=0.95,
                        help="largest SAP γ fit_gamma may use (default 0.95)")
    parser.add_argument("--no-data", action="store_true",
                        help="profile on standard normal images, not the config's training data (no dataset needed; "
                             "SAP's kept counts then miss the data's zeros and ties)")
    parser.add_argument("--measure", action="store_true", help="also measure the planned step on the config's data")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by method")
    parser.add_argument("--params", default="params.yaml", help="experiment config (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one value of the config, e.g. --set data.cifar_shape=true (repeatable)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        raise PlanError(f"--budget must be a positive number of MiB, got {args.budget:g}")
    if args.batch_size is not None and args.batch_size < 1:
        raise PlanError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.min_batch < 1:
        raise PlanError(f"--min-batch must be at least 1, got {args.min_batch}")
    if not 0 <= args.max_gamma < 1:
        raise PlanError(f"--max-gamma must be in [0, 1), got {args.max_gamma:g}")
    return args


def method_config(args: argparse.Namespace, method: str, **values: Any) -> ExperimentConfig:
    """The experiment ``method`` runs: ``--params`` with ``--set``, the command's options and ``values``."""
    overrides = dict(parse_override(s) for s in args.set)
    overrides.update({"model.arch": args.arch, "pruning.method": method, **values})
    if args.batch_size is not None:
        overrides.setdefault("federation.batch_size", args.batch_size)
    return load_config(args.params, overrides)


def plan_method(args: argparse.Namespace, method: str) -> dict[str, Any]:
    config = method_config(args, method)
    step = ClientStep.of(config)
    if args.min_batch > step.batch_size:
        raise PlanError(f"--min-batch {args.min_batch} is above the batch size {step.batch_size}")
    try:
        data = None if args.no_data else load_dataset(config.data)[0]
    except DatasetUnavailable as exc:
        raise PlanError(f"{exc} Or plan without the data: --no-data.") from None
    profile = profile_config(config, data)
    planned = fit(profile, step, args.budget, args.policy, bound=args.bound, min_batch=args.min_batch,
                  max_gamma=max(args.max_gamma, step.gamma or 0.0))
    out = as_dict(planned)
    if args.measure:
        out["measured"] = measured(args, method, planned)
    return out


def as_dict(planned: Fit) -> dict[str, Any]:
    parts = planned.parts_mib()
    return {"fits": planned.fits, "batch_size": planned.batch_size, "gamma": planned.gamma,
            "footprint_mib": parts["footprint"], "total_mib": parts["total"],
            "parts_mib": {k: parts[k] for k in PARTS}, "budget_mib": planned.budget_mib, "bound": planned.bound}


def measured(args: argparse.Namespace, method: str, planned: Fit) -> dict[str, float]:
    from tasks.memory import initial_step_report  # imports MLflow: only when asked

    values: dict[str, Any] = {"federation.batch_size": planned.batch_size}
    if planned.gamma is not None:
        values["sap.gamma"] = planned.gamma
    report = initial_step_report(method_config(args, method, **values))
    return {"footprint_mib": report.footprint_bytes / MIB, "total_mib": report.total_bytes / MIB,
            **{f"{k}_mib": v / MIB for k, v in report.parts().items()}}


def table(args: argparse.Namespace, plans: dict[str, dict[str, Any]]) -> str:
    """The plans as a Markdown table (MiB)."""
    head = ["method", "trains", "batch", "γ", *PARTS, "footprint", "total"]
    if args.measure:
        head += ["measured footprint", "measured total"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, p in plans.items():
        cells = [method, "yes" if p["fits"] else "no: needs", str(p["batch_size"]),
                 "—" if p["gamma"] is None else f"{p['gamma']:g}", *(f"{p['parts_mib'][k]:.2f}" for k in PARTS),
                 f"{p['footprint_mib']:.2f}", f"{p['total_mib']:.2f}"]
        if args.measure:
            cells += [f"{p['measured']['footprint_mib']:.2f}", f"{p['measured']['total_mib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{args.arch}, budget {args.budget:g} MiB on the {args.bound}, policy {args.policy}; "
                 "a method marked 'no: needs' shows what the smallest step it may take holds.")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, dict[str, Any]]:
    """The CLI: one plan per method, as a table or (``--json``) one JSON object keyed by method."""
    try:
        args = parse_args(argv, prog)
        plans = {method: plan_method(args, method) for method in args.method}
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(plans, indent=2) if args.json else table(args, plans))
    return plans


if __name__ == "__main__":
    main()
