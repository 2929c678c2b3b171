"""Time per round three ways: the bare fedmef_core loop, the Prefect train flow with MLflow tracking
(local runner), and the same flow on a local Ray cluster.

    python bench/overhead.py [--rounds 5] [--params params.yaml]

Prints a table and writes bench/results/overhead.json. The default experiment's config is used with
`federation.rounds` lowered; every way runs the same rounds, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import flows  # noqa: E402,F401 - quiet Prefect defaults
from fedmef_core.config import load_config, parse_config  # noqa: E402
from fedmef_core.data import load_dataset, partition_indices, partition_stats, save_partition  # noqa: E402
from fedmef_core.device import resolve_device  # noqa: E402
from fedmef_core.engine import Server, run_rounds  # noqa: E402


def _config(params: str, rounds: int, work: Path, **runtime):
    raw = load_config(params).model_dump(mode="json")
    raw["federation"]["rounds"] = rounds
    raw["runtime"].update(
        partitions_dir=str(work / "partitions"), checkpoints_dir=str(work / "ckpt"),
        metrics_dir=str(work / "metrics"), plots_dir=str(work / "plots"), **runtime,
    )
    raw["tracking"]["mlflow_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    return parse_config(raw)


def prepared(config):
    """Write the partition the train flow reads (the same split for every way)."""
    train, _ = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    stats = partition_stats(parts, train.labels.numpy(), train.num_classes)
    save_partition(parts, stats, config.runtime.partitions_dir)
    return config


def bare(config) -> float:
    train, test = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    server = Server(config, train, test, parts, resolve_device(config.runtime.device))
    start = time.perf_counter()
    run_rounds(server, checkpoint_dir=config.runtime.checkpoints_dir)
    return (time.perf_counter() - start) / config.federation.rounds


def flow(config) -> float:
    from flows.train import train_flow

    return train_flow(config)["seconds_per_round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        results["bare fedmef_core loop"] = bare(_config(args.params, args.rounds, work / "bare"))
        local = prepared(_config(args.params, args.rounds, work / "flow"))
        results["Prefect flow + MLflow (local)"] = flow(local)
        if not args.skip_ray:
            on_ray = prepared(_config(args.params, args.rounds, work / "ray", runner="ray", workers=2))
            results["Prefect flow + MLflow (Ray, 2 workers)"] = flow(on_ray)
    base = results["bare fedmef_core loop"]
    print(f"\n{'way':<42}{'s/round':>10}{'vs bare':>10}")
    for name, sec in results.items():
        print(f"{name:<42}{sec:>10.2f}{sec / base - 1:>+10.1%}")
    out = ROOT / "bench" / "results" / "overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "seconds_per_round": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
