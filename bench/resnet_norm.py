"""NSConv against BatchNorm on the paper's model family, at a size two CPU cores train in minutes.

FedMef replaces BatchNorm with NSConv. Before anyone spends a GPU on NSConv ResNet18, this shows whether an
NSConv ResNet learns as well as its BatchNorm twin: ResNet8 (``model.arch: resnet8``, torchvision's
``BasicBlock``, 16-32-64 channels) on Fashion-MNIST as 3x32x32 images (``data.cifar_shape``), the first
6,000 training and 2,000 test images, trained

- centrally: one client holding all the data (FedAvg of one client is SGD), 10 epochs;
- federated: 20 clients (Dirichlet 0.5), 4 a round, 30 rounds of 1 local epoch — dense FedAvg, and FedMef
  at d = 0.1 in its paper configuration apart from the norm (SAP and BaE on, adjustments every 5 rounds
  until round 25),

each with ``model.norm`` nsconv and batch over the same seeds (same partition, sampling and initial weights
per seed). Every run is a sweep cell (`runs/`, MLflow experiment `bench-resnet-norm`); the score is the mean
test accuracy of the last 5 evaluated rounds, and NSConv − BatchNorm is paired by seed with a 95% t-interval.

    python -m bench.resnet_norm            # 3 seeds, about 20 minutes on 2 CPU cores

Writes ``bench/results/resnet_norm.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.accuracy import flat
from flows.sweep import main as sweep_main
from services.comparison import t_interval

RESULTS = Path(__file__).resolve().parent / "results"
NORMS = ("nsconv", "batch")
COMMON = {
    "data": {"name": "fashion_mnist", "cifar_shape": True, "train_limit": 6000, "test_limit": 2000},
    "model": {"arch": "resnet8"},
    "runtime": {"device": "cpu"},
    "tracking": {"experiment": "bench-resnet-norm"},
}
SETTINGS = {
    "central": ({
        "partition": {"scheme": "iid", "min_samples": 10},
        "federation": {"num_clients": 1, "clients_per_round": 1, "rounds": 10, "local_epochs": 1,
                       "batch_size": 32, "lr": 0.05, "lr_final": 0.01},
    }, ["fedavg"]),
    "federated": ({
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 10},
        "federation": {"num_clients": 20, "clients_per_round": 4, "rounds": 30, "local_epochs": 1,
                       "batch_size": 32, "lr": 0.05, "lr_final": 0.01},
        "pruning": {"adjust_interval": 5, "adjust_until": 25, "adjust_alpha": 0.2},
    }, ["fedavg", "fedmef"]),
}


def run_setting(setting: str, norm: str, seeds: int, jobs: int, root: Path) -> list[dict]:
    overrides, methods = SETTINGS[setting]
    sets = {**flat(COMMON), **flat(overrides), "model.norm": norm}
    argv = ["--methods", *methods, "--densities", "0.1", "--seeds", *map(str, range(seeds)),
            "--reference", methods[0], "--jobs", str(jobs), "--name", f"bench-resnet-norm-{setting}-{norm}",
            "--root", str(root), *(a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}"))]
    return sweep_main(argv)["cells"]


def compare(cells: dict[str, list[dict]]) -> list[dict]:
    """NSConv − BatchNorm per (setting, method), paired by seed, on the mean of the last rounds."""
    rows = []
    for setting, (_, methods) in SETTINGS.items():
        for method in methods:
            score = {norm: {c["seed"]: c["mean_last"] for c in cells[f"{setting}/{norm}"] if c["method"] == method}
                     for norm in NORMS}
            seeds = sorted(set(score["nsconv"]) & set(score["batch"]))
            diffs = [score["nsconv"][s] - score["batch"][s] for s in seeds]
            iv = t_interval(diffs)
            rows.append({"setting": setting, "method": method, "seeds": seeds,
                         "nsconv": [score["nsconv"][s] for s in seeds], "batch": [score["batch"][s] for s in seeds],
                         "difference": iv.mean, "low": iv.low, "high": iv.high})
    return rows


def table(rows: list[dict]) -> str:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = ["| setting | method | seeds | NSConv | BatchNorm | NSConv − BatchNorm [95% interval] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | {len(r['seeds'])} | {mean(r['nsconv']):.4f} | "
                     f"{mean(r['batch']):.4f} | {r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cells trained at once")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="folder of the cells' run folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "resnet_norm.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cells = {f"{s}/{n}": run_setting(s, n, args.seeds, args.jobs, args.root) for s in SETTINGS for n in NORMS}
    rows = compare(cells)
    print("\nResNet8, Fashion-MNIST 3x32x32: mean test accuracy of the last 5 rounds, paired by seed\n")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "seconds": round(time.perf_counter() - started)}, indent=2) + "\n")
    print(f"\n{sum(map(len, cells.values()))} cells in {time.perf_counter() - started:.0f}s -> {args.out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
