"""Accuracy of the federated pruning methods: methods x densities x seeds on Fashion-MNIST, run as a sweep.

A thin front end over `flows.sweep`: each setting below is a set of overrides on `params.yaml`, every
(method, density, seed) is one experiment in `runs/` and one child run of the sweep's MLflow parent run
(experiment `bench-accuracy`), so every published number can be opened in MLflow. A re-run skips the
cells that finished. Small CNN on CPU, Dirichlet(0.5) label skew. For every (method, density) it reports
the test accuracy averaged over the last 5 evaluated rounds (``runtime.eval_mean_last``; mean, std and per
seed; the last round's beside it), the paired difference of that mean against `--reference` per seed with a
95% t-interval, and the accuracy drop caused by the mask adjustments:

- ``post_adjust_drop``: mean over adjustment rounds r of acc(r-1) - acc(r), the change across the
  round whose aggregation ended with prune-and-grow (positive = accuracy fell);
- ``prune_drop``: mean over adjustment rounds of the test accuracy just before minus just after the
  server's prune-and-grow, read from the run's round history where the core logs it (else absent).

Dense ``fedavg`` runs once per seed and is listed under density "1.0". By default (``--sap auto``)
``fedmef`` also trains with scaled activation pruning (the config's default); ``--sap off`` isolates BaE.

    python -m bench.accuracy --quick      # <= 15 min on 2 CPU cores
    python -m bench.accuracy --medium --methods feddst fedtiny fedmef   # 5 seeds, about an hour on 2 CPU cores
    python -m bench.accuracy              # the larger setting (hours on CPU)
    python -m bench.accuracy --bae        # BaE on/off: fedtiny vs fedmef without SAP, large late adjustments
    python -m bench.accuracy --bae --methods fedmef --bae-lambda 1.0   # the extrusion weight swept
    python -m bench.accuracy --quick --methods fedtiny fedmef --bn-select  # FedTiny's adaptive BN selection

``--quick``: 20 clients, 4 per round, 8 rounds of 1 local epoch, the first 4000 training and 1000
test images, adjustments every 2 rounds until round 6 (alpha 0.2), 3 seeds; FedMef in its paper configuration
(NSConv, SAP, BaE), the baselines with BatchNorm.
``--medium``: 20 clients, 4 per round, 30 rounds of 1 local epoch on the first 6000 training and 2000 test
images, adjustments every 5 rounds until round 25, 5 seeds; FedMef in its paper configuration (NSConv, SAP,
BaE), the baselines with BatchNorm.
The full setting: 100 clients, 10 per round, 50 rounds of 2 local epochs, all 60k/10k images,
adjustments every 5 rounds until round 40, 3 seeds.
Writes ``bench/results/accuracy.json`` (``--medium``: ``accuracy_medium.json``;
``{method: {density: {mean, std, per_seed, post_adjust_drop,
prune_drop, footprint_mib, mlflow_run_ids}}, "paired": {fedtiny|feddst: [{method, density, differences, mean,
low, high}]}}``, accuracies in [0, 1]) and ``bench/results/accuracy.png``,
and prints the sweep's table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from flows.sweep import main as sweep_main
from services.comparison import DENSE, CellResult, paired_differences

METHODS = ["fedavg", "fedavg_static", "prunefl", "feddst", "fedtiny", "fedmef"]
DENSITIES = [0.05, 0.1, 0.2]
RESULTS = Path(__file__).resolve().parent / "results"

COMMON = {  # what every setting shares (the old bench's fixed choices)
    "data": {"name": "fashion_mnist"},
    "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 10},
    "model": {"arch": "cnn"},
    "runtime": {"device": "cpu"},
    "tracking": {"experiment": "bench-accuracy"},
}
QUICK = {
    "data": {"train_limit": 4000, "test_limit": 1000},
    "federation": {"num_clients": 20, "clients_per_round": 4, "rounds": 8, "local_epochs": 1,
                   "batch_size": 32, "lr": 0.05, "lr_final": 0.01},
    "pruning": {"adjust_interval": 2, "adjust_until": 6, "adjust_alpha": 0.2},
}
BAE_STUDY = {  # the quick data and clients; adjustments late and large enough for pruning to hurt
    "data": QUICK["data"],
    "federation": {**QUICK["federation"], "rounds": 12},
    "pruning": {"adjust_interval": 3, "adjust_until": 11, "adjust_alpha": 0.6},
}
MEDIUM = {  # long enough for the methods to separate, about an hour on 2 CPU cores
    "data": {"train_limit": 6000, "test_limit": 2000},
    "federation": {**QUICK["federation"], "rounds": 30},
    "pruning": {"adjust_interval": 5, "adjust_until": 25, "adjust_alpha": 0.2},
}
FULL = {
    "data": {},
    "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 50, "local_epochs": 2,
                   "batch_size": 32, "lr": 0.05, "lr_final": 0.01},
    "pruning": {"adjust_interval": 5, "adjust_until": 40, "adjust_alpha": 0.2},
}
# auto: FedMef as the paper runs it (NSConv, SAP), the baselines with BatchNorm. The BaE study keeps BatchNorm
# for both of its methods (and SAP off), so fedtiny and fedmef differ only by BaE.
NORM = {"quick": "auto", "bae": "batch", "full": "auto", "medium": "auto"}
PAIRED_AGAINST = ("fedtiny", "feddst")  # FedMef's claim is against these two


def flat(setting: dict) -> dict:
    """Nested sections -> `section.key` overrides."""
    return {f"{section}.{key}": value for section, values in setting.items() for key, value in values.items()}


def sweep_args(args: argparse.Namespace, setting: str, name: str) -> list[str]:
    """The bench's settings as `flows.sweep` arguments."""
    grid = {"quick": QUICK, "bae": BAE_STUDY, "medium": MEDIUM, "full": FULL}[setting]
    overrides = {**flat(COMMON), **flat(grid)}
    norm = args.norm or NORM[setting]
    if norm != "auto":
        overrides["model.norm"] = norm
    if args.sap != "auto":
        overrides["sap.enabled"] = args.sap == "on"
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if args.bn_select:
        sets += [f"{m}:pruning.bn_select=true" for m in ("fedtiny", "fedmef") if m in args.methods]
    if args.bae_lambda is not None and "fedmef" in args.methods:
        sets.append(f"fedmef:pruning.bae_lambda={args.bae_lambda}")
    reference = args.reference or ("fedtiny" if "fedtiny" in args.methods else args.methods[0])
    return ["--methods", *args.methods, "--densities", *map(str, args.densities),
            "--seeds", *map(str, range(args.seeds)), "--reference", reference, "--jobs", str(args.jobs),
            "--name", name, "--root", str(args.root), *(s for kv in sets for s in ("--set", kv))]


def results_json(result: dict) -> dict:
    """The sweep's rows in the bench's format, with the MLflow run of every seed."""
    table: dict = {}
    for row in result["rows"]:
        dense = row["density"] == DENSE
        key = "1.0" if dense else str(row["density"])
        runs = sorted({(c["seed"], c["mlflow_run_id"]) for c in result["cells"]
                       if c["method"] == row["method"] and (c["dense"] if dense else c["density"] == row["density"])})
        table.setdefault(row["method"], {})[key] = {
            "mean": row["mean"], "std": row["std"], "per_seed": list(row["accuracies"]),
            "last_round_mean": statistics.fmean(row["last_round"]) if row["last_round"] else None,
            "last_round_per_seed": list(row["last_round"]),
            "post_adjust_drop": row["post_adjust_drop"], "prune_drop": row["prune_drop"],
            "footprint_mib": row["footprint_mib"], "mlflow_run_ids": [run_id for _, run_id in runs],
        }
    return table


def cell_result(cell: dict) -> CellResult:
    """A sweep's cell as written to JSON (``cells.json``, the sweep's result) back as a :class:`CellResult`."""
    return CellResult(**{**cell, "curve": tuple(map(tuple, cell["curve"]))})


def paired_json(result: dict, references: list[dict] = ()) -> dict:
    """Paired differences (mean and 95% t-interval over seeds) of every method against fedtiny and feddst;
    ``references``: cells of another sweep (its ``cells.json``) that hold them, e.g. for an ablation."""
    own = [cell_result(c) for c in result["cells"]]
    others = [cell_result(c) for c in references
              if c["method"] in PAIRED_AGAINST and c["method"] not in {r.method for r in own}]
    cells = own + others
    out: dict = {}
    for reference in PAIRED_AGAINST:
        if any(c.method == reference for c in cells):
            out[reference] = [
                {"method": p.method, "density": p.density, "differences": list(p.differences),
                 "mean": p.interval.mean, "low": p.interval.low, "high": p.interval.high}
                for p in paired_differences(cells, reference)
            ]
    return out


def paired_text(paired: dict) -> str:
    lines = []
    for reference, rows in paired.items():
        lines.append(f"\npaired by seed: method - {reference} (mean [95% interval])")
        for r in rows:
            interval = f"[{r['low']:+.4f}, {r['high']:+.4f}]"
            lines.append(f"  {r['method']:>14} d={r['density']:<5g} {r['mean']:+.4f} {interval}")
    return "\n".join(lines)


def plot(table: dict, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, by_d in table.items():
        if method == "fedavg":
            ax.axhline(by_d["1.0"]["mean"], color="black", linestyle="--", label="fedavg (dense)")
            continue
        ds = sorted(by_d, key=float)
        ax.errorbar([float(d) for d in ds], [by_d[d]["mean"] for d in ds], yerr=[by_d[d]["std"] for d in ds],
                    marker="o", capsize=3, label=method)
    ax.set(xlabel="density d", ylabel="final test accuracy", title=title, xscale="log")
    ax.set_xticks(DENSITIES, labels=[str(d) for d in DENSITIES])
    ax.set_xticks([], minor=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small setting (<= 15 min on 2 CPU cores)")
    size.add_argument("--medium", action="store_true", help="30 rounds, FedMef as in the paper (~1 h on 2 cores)")
    size.add_argument("--bae", action="store_true",
                      help="the BaE study: fedtiny vs fedmef without SAP (they differ only by BaE), 12 rounds, "
                           "adjustments at rounds 3, 6, 9 moving 50%%, 26%%, 5%% of the active weights")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --medium: 5)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--densities", nargs="+", type=float, default=DENSITIES)
    parser.add_argument("--reference", choices=METHODS, default=None, help="paired differences against (fedtiny)")
    parser.add_argument("--jobs", "--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="cells trained at the same time")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="folder of the cells' run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/accuracy.json; --medium: accuracy_medium.json)")
    parser.add_argument("--sap", choices=["auto", "on", "off"], default="auto",
                        help="scaled activation pruning: auto = the config default (on for fedmef only)")
    parser.add_argument("--norm", choices=["auto", "batch", "nsconv"], default=None,
                        help="normalisation: auto = NSConv for fedmef as in the paper, BatchNorm for the baselines "
                             "(default; the --bae study: batch), batch or nsconv for every method")
    parser.add_argument("--bn-select", action="store_true",
                        help="fedtiny and fedmef choose their initial mask by adaptive BN selection (5 candidates)")
    parser.add_argument("--pair-with", type=Path, default=None, metavar="CELLS_JSON",
                        help="pair against fedtiny/feddst cells of another sweep (its runs/sweeps/<name>/cells.json), "
                             "e.g. an ablation of fedmef against the --medium sweep's baselines")
    parser.add_argument("--bae-lambda", type=float, default=None,
                        help="FedMef's extrusion-loss weight lambda (default: the config's, 1.0)")
    args = parser.parse_args()
    setting = "quick" if args.quick else "medium" if args.medium else "bae" if args.bae else "full"
    if args.bae:
        args.methods = args.methods or ["fedtiny", "fedmef"]
        args.sap = "off"
    args.methods = args.methods or METHODS
    args.seeds = args.seeds or (5 if args.medium else 3)
    out = args.out or RESULTS / {"bae": "accuracy_bae.json", "medium": "accuracy_medium.json"}.get(setting,
                                                                                                   "accuracy.json")
    started = time.perf_counter()
    result = sweep_main(sweep_args(args, setting, name=f"bench-{out.stem}-{setting}"))
    table = results_json(result)
    references = json.loads(args.pair_with.read_text()) if args.pair_with else []
    paired = paired_json(result, references)
    print(paired_text(paired))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**table, "paired": paired}, indent=2) + "\n")
    plot(table, out.with_suffix(".png"), f"Fashion-MNIST, Dirichlet(0.5), {setting}")
    print(f"\n{len(result['cells'])} cells in {time.perf_counter() - started:.0f}s -> {out}; MLflow parent run "
          f"{result['parent_run_id'] or '(tracking off)'} ({result['name']}), comparison in "
          f"{args.root / 'sweeps' / result['name']}")


if __name__ == "__main__":
    main()
