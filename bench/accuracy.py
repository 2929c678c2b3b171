"""Accuracy of the federated pruning methods: methods x densities x seeds on Fashion-MNIST.

Runs the core round loop directly (`fedmef_core.engine.run_rounds`, in-process clients; no Prefect,
no MLflow), small CNN on CPU, Dirichlet(0.5) label skew. For every (method, density) it reports the
final test accuracy (mean, std and per seed) and the accuracy drop caused by the mask adjustments:

- ``post_adjust_drop``: mean over adjustment rounds r of acc(r-1) - acc(r), the change across the
  round whose aggregation ended with prune-and-grow (positive = accuracy fell);
- ``prune_drop``: mean over adjustment rounds of the test accuracy of the aggregated model just
  before minus just after the server's prune-and-grow (exact; only for the methods that adjust on
  the server after averaging: fedtiny, fedmef, prunefl). fedtiny vs fedmef = without vs with BaE.

Dense ``fedavg`` is run once per seed and listed under density "1.0". By default (``--sap auto``)
``fedmef`` also trains with scaled activation pruning (the config's default); ``--sap off`` isolates BaE.

    python -m bench.accuracy --quick      # <= 15 min on 2 CPU cores
    python -m bench.accuracy              # the larger setting (hours on CPU)
    python -m bench.accuracy --bae        # BaE on/off: fedtiny vs fedmef without SAP, large late adjustments
    python -m bench.accuracy --bae --methods fedmef --bae-lambda 1.0   # the extrusion weight swept
    python -m bench.accuracy --quick --methods fedtiny fedmef --bn-select  # FedTiny's adaptive BN selection

``--quick``: 20 clients, 4 per round, 8 rounds of 1 local epoch, the first 4000 training and 1000
test images, adjustments every 2 rounds until round 6 (alpha 0.2), 3 seeds.
The full setting: 100 clients, 10 per round, 50 rounds of 2 local epochs, all 60k/10k images,
adjustments every 5 rounds until round 40, 3 seeds.
Writes ``bench/results/accuracy.json`` (``{method: {density: {mean, std, per_seed, post_adjust_drop,
prune_drop}}}``, accuracies in [0, 1]) and ``bench/results/accuracy.png``, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METHODS = ["fedavg", "fedavg_static", "prunefl", "feddst", "fedtiny", "fedmef"]
DENSITIES = [0.05, 0.1, 0.2]
RESULTS = Path(__file__).resolve().parent / "results"

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
FULL = {
    "data": {},
    "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 50, "local_epochs": 2,
                   "batch_size": 32, "lr": 0.05, "lr_final": 0.01},
    "pruning": {"adjust_interval": 5, "adjust_until": 40, "adjust_alpha": 0.2},
}


def run_one(setting: dict, method: str, density: float, seed: int, sap: bool | None = None,
            norm: str = "batch", pruning: dict | None = None) -> dict:
    """One training run; returns the final accuracy and the adjustment drops."""
    import torch

    torch.set_num_threads(1)
    from fedmef_core.config import parse_config
    from fedmef_core.data import load_dataset, partition_indices
    from fedmef_core.device import resolve_device
    from fedmef_core.engine import Server, run_rounds
    from fedmef_core.evaluation import evaluate

    raw = {
        "data": {"name": "fashion_mnist", **setting["data"]},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 10, "seed": seed},
        "federation": {**setting["federation"], "seed": seed},
        "pruning": {"method": method, "density": density, **setting["pruning"], **(pruning or {})},
        "sap": {"enabled": sap},
        "model": {"arch": "cnn", "norm": norm},
        "tracking": {"enabled": False},
        "runtime": {"device": "cpu"},
    }
    config = parse_config(raw)
    train, test = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    device = resolve_device("cpu")
    server = Server(config, train, test, parts, device)
    prune_drops: list[float] = []
    algorithm = server.algorithm
    if hasattr(algorithm, "adjust") and method in ("fedtiny", "fedmef", "prunefl"):
        original = algorithm.adjust

        def measured(rnd, model, results, state):
            before = evaluate(model, test, device).accuracy
            out = original(rnd, model, results, state)
            prune_drops.append(before - evaluate(model, test, device).accuracy)
            return out

        algorithm.adjust = measured
    started = time.perf_counter()
    history = run_rounds(server)
    acc = {h["round"]: h["accuracy"] for h in history}
    drops = [acc[h["round"] - 1] - acc[h["round"]] for h in history if h.get("adjusted") and h["round"] > 1]
    return {
        "method": method, "density": density, "seed": seed, "accuracy": acc[max(acc)],
        "post_adjust_drop": statistics.fmean(drops) if drops else 0.0,
        "prune_drop": statistics.fmean(prune_drops) if prune_drops else None,
        "seconds": time.perf_counter() - started,
    }


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        key = "1.0" if r["method"] == "fedavg" else str(r["density"])
        out.setdefault(r["method"], {}).setdefault(key, []).append(r)
    table: dict = {}
    for method, by_density in out.items():
        for key, rs in by_density.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            accs = [r["accuracy"] for r in rs]
            pd = [r["prune_drop"] for r in rs if r["prune_drop"] is not None]
            table.setdefault(method, {})[key] = {
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "per_seed": accs,
                "post_adjust_drop": statistics.fmean(r["post_adjust_drop"] for r in rs),
                "prune_drop": statistics.fmean(pd) if pd else None,
            }
    return table


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
    parser.add_argument("--quick", action="store_true", help="the small setting (<= 15 min on 2 CPU cores)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--densities", nargs="+", type=float, default=DENSITIES)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--sap", choices=["auto", "on", "off"], default="auto",
                        help="scaled activation pruning: auto = the config default (on for fedmef only)")
    parser.add_argument("--norm", choices=["batch", "nsconv"], default="batch",
                        help="normalisation of the CNN: BatchNorm, or NSConv (FedMef's 'scaled' part, no BN)")
    parser.add_argument("--bn-select", action="store_true",
                        help="fedtiny and fedmef choose their initial mask by adaptive BN selection (5 candidates)")
    parser.add_argument("--bae-lambda", type=float, default=None,
                        help="FedMef's extrusion-loss weight lambda (default: the config's, 0.01)")
    parser.add_argument("--bae", action="store_true",
                        help="the BaE study: fedtiny vs fedmef without SAP (they differ only by BaE), 12 rounds, "
                             "adjustments at rounds 3, 6, 9 moving 50%%, 26%%, 5%% of the active weights")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    if args.bae:
        setting = BAE_STUDY
        if args.methods == METHODS:
            args.methods = ["fedtiny", "fedmef"]
        args.sap = "off"
        if args.out == RESULTS / "accuracy.json":
            args.out = RESULTS / "accuracy_bae.json"
    jobs = [(m, 1.0 if m == "fedavg" else d, s) for m in args.methods
            for d in ([1.0] if m == "fedavg" else args.densities) for s in range(args.seeds)]

    def overrides(method: str) -> dict:
        out: dict = {}
        if args.bn_select and method in ("fedtiny", "fedmef"):
            out["bn_select"] = True
        if args.bae_lambda is not None and method == "fedmef":
            out["bae_lambda"] = args.bae_lambda
        return out

    started = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        sap = {"auto": None, "on": True, "off": False}[args.sap]
        futures = [pool.submit(run_one, setting, m, d, s, sap, args.norm, overrides(m)) for m, d, s in jobs]
        for i, f in enumerate(futures, 1):
            r = f.result()
            runs.append(r)
            print(f"[{i}/{len(jobs)}] {r['method']:<14} d={r['density']:<5} seed={r['seed']} "
                  f"acc={r['accuracy']:.4f} ({r['seconds']:.0f}s, {time.perf_counter() - started:.0f}s total)",
                  flush=True)
    table = summarise(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    name = "BaE study" if args.bae else "quick" if args.quick else "full"
    plot(table, args.out.with_suffix(".png"), f"Fashion-MNIST, Dirichlet(0.5), {name}")
    print(f"\n{'method':<14} {'density':>7} {'accuracy':>16} {'post-adjust drop':>17} {'prune drop':>11}")
    for method, by_d in table.items():
        for d, v in sorted(by_d.items(), key=lambda kv: float(kv[0])):
            pd = "-" if v["prune_drop"] is None else f"{v['prune_drop']:+.4f}"
            print(f"{method:<14} {d:>7} {v['mean']:>9.4f} ± {v['std']:.4f} {v['post_adjust_drop']:>+17.4f} {pd:>11}")
    print(f"\n{len(runs)} runs in {time.perf_counter() - started:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
