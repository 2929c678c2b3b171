"""Fast at scale: seconds per round and peak memory of the bare loop vs the Prefect train flow (+MLflow
sqlite), and the peak memory of aggregation alone with ResNet18-sized updates, streamed vs all in memory.

    python bench/scale.py [--rounds 3] [--repeats 3] [--updates 10 100 1000] [--skip-loops] [--skip-aggregation]

Loops: FedAvg, small CNN, 1 local epoch, batch 32, iid shards of 20 samples a client, at
(clients, clients per round) in {(100, 10), (1000, 100)}; `--repeats` alternating runs of each way, the
median reported (the machine is shared: the same loop drifts by 10-20% over minutes). Aggregation: the
FedAvg `Aggregator` fed K synthetic ResNet18 state dicts through `RoundResults` (one alive at a time) vs
the same K state dicts built in a list first and averaged (as before streaming), K in {10, 100, 1000};
the list way is skipped where K updates would not fit in memory. Every measurement runs in a subprocess
of its own; peak RSS is that process's ``ru_maxrss`` (Prefect's temporary API server, a separate process,
is not counted). Prints a table and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = [(100, 10), (1000, 100)]
SAMPLES_PER_CLIENT = 20
UPDATE_COUNTS = [10, 100, 1000]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def loop_config(work: Path, clients: int, per_round: int, rounds: int):
    from fedmef_core.config import parse_config
    from tests.conftest import tiny_raw

    raw = tiny_raw(work)
    raw["data"].update(train_limit=clients * SAMPLES_PER_CLIENT, test_limit=1000)
    raw["partition"] = {"scheme": "iid", "seed": 1}
    raw["federation"].update(num_clients=clients, clients_per_round=per_round, min_clients=1, rounds=rounds,
                             local_epochs=1, batch_size=32)
    raw["runtime"].update(checkpoint_every=rounds, eval_every=rounds)
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "scale"}
    return parse_config(raw)


def run_loop(way: str, clients: int, per_round: int, rounds: int) -> dict:
    """One way's seconds per round (this process)."""
    import flows  # noqa: F401 - quiet Prefect defaults
    from fedmef_core.data import load_dataset
    from fedmef_core.device import resolve_device
    from fedmef_core.engine import Server, run_rounds
    from tests.conftest import save_partition_of

    with tempfile.TemporaryDirectory(prefix="fedmef-scale-") as tmp:
        config = loop_config(Path(tmp), clients, per_round, rounds)
        parts = save_partition_of(config)
        if way == "bare":
            train, test = load_dataset(config.data)
            server = Server(config, train, test, parts, resolve_device("cpu"))
            start = time.perf_counter()
            run_rounds(server, checkpoint_dir=config.runtime.checkpoints_dir)
            seconds = (time.perf_counter() - start) / rounds
        else:
            from flows.train import train_flow

            seconds = train_flow(config)["seconds_per_round"]
    return {"s_per_round": seconds, "peak_rss_mib": peak_rss_mib()}


def run_aggregation(way: str, count: int) -> dict:
    """Peak memory of aggregating `count` ResNet18-sized FedAvg updates (this process)."""

    from fedmef_core.aggregation import weighted_average
    from fedmef_core.algorithms import ClientResult
    from fedmef_core.algorithms.base import FederatedAlgorithm
    from fedmef_core.config import ModelConfig, parse_config
    from fedmef_core.engine import RoundResults
    from fedmef_core.models import build_model
    from tests.conftest import tiny_raw

    model = build_model(ModelConfig(arch="resnet18", norm="batch"), 3, 10, 32)
    base = model.state_dict()

    def update(c: int) -> ClientResult:  # cheap synthetic weights, different per client
        state = {k: (v + (c % 7) * 1e-3) if v.is_floating_point() else v.clone() for k, v in base.items()}
        return ClientResult(client_id=c, num_samples=10 + c % 5, state=state, train_loss=0.0, steps=1)

    start = time.perf_counter()
    if way == "streaming":
        results = RoundResults({c: 10 + c % 5 for c in range(count)}, update)
        aggregator = FederatedAlgorithm(parse_config(tiny_raw())).aggregator(1, model, {}, results.total_samples)
        for r in results:
            aggregator.add(r)
            del r
        aggregator.finish(model, {})
    else:
        results = [update(c) for c in range(count)]
        model.load_state_dict(weighted_average([r.state for r in results], [r.num_samples for r in results]))
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
            "update_mib": sum(v.numel() * v.element_size() for v in base.values()) / 2**20}


def in_subprocess(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "--one", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loops(rounds: int, repeats: int) -> list[dict]:
    rows = []
    for clients, per_round in SHAPES:
        runs: dict[str, list[dict]] = {"bare": [], "flow": []}
        for _ in range(repeats):  # alternate the ways, so drift hits both alike
            for way in runs:
                runs[way].append(in_subprocess("loop", way, str(clients), str(per_round), str(rounds)))
        med = {way: statistics.median(r["s_per_round"] for r in rs) for way, rs in runs.items()}
        rows.append({
            "clients": clients, "per_round": per_round,
            "bare_s_per_round": med["bare"], "flow_s_per_round": med["flow"],
            "flow_overhead_pct": 100 * (med["flow"] / med["bare"] - 1),
            "bare_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["bare"]),
            "flow_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["flow"]),
            "runs": runs,
        })
    return rows


def aggregation(counts: list[int], memory_mib: float) -> list[dict]:
    rows = []
    for count in counts:
        row = {"updates": count, "streaming": in_subprocess("aggregate", "streaming", str(count))}
        needed = count * row["streaming"]["update_mib"] * 1.1
        row["in_memory"] = in_subprocess("aggregate", "in_memory", str(count)) if needed < 0.5 * memory_mib \
            else {"skipped": f"needs ~{needed / 1024:.0f} GiB"}
        rows.append(row)
    return rows


def table(result: dict) -> str:
    lines = []
    if result.get("loops"):
        lines.append(f"{'N':>5} {'K':>4} {'bare s/round':>13} {'flow s/round':>13} {'overhead':>9} "
                     f"{'bare RSS MiB':>13} {'flow RSS MiB':>13}")
        for r in result["loops"]:
            lines.append(f"{r['clients']:>5} {r['per_round']:>4} {r['bare_s_per_round']:>13.3f} "
                         f"{r['flow_s_per_round']:>13.3f} {r['flow_overhead_pct']:>8.1f}% "
                         f"{r['bare_peak_rss_mib']:>13.0f} {r['flow_peak_rss_mib']:>13.0f}")
    if result.get("aggregation"):
        lines.append(f"{'K (ResNet18 updates)':>21} {'streaming RSS MiB':>18} {'in-memory RSS MiB':>18}")
        for r in result["aggregation"]:
            mem = r["in_memory"]
            lines.append(f"{r['updates']:>21} {r['streaming']['peak_rss_mib']:>18.0f} "
                         f"{mem['peak_rss_mib'] if 'peak_rss_mib' in mem else mem['skipped']:>18}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--updates", type=int, nargs="+", default=UPDATE_COUNTS,
                        help="numbers of ResNet18-sized updates to aggregate")
    parser.add_argument("--skip-loops", action="store_true")
    parser.add_argument("--skip-aggregation", action="store_true")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a single measurement (subprocess)
    args = parser.parse_args()
    if args.one:
        kind, way, *rest = args.one
        answer = run_loop(way, *map(int, rest)) if kind == "loop" else run_aggregation(way, int(rest[0]))
        print(json.dumps(answer))
        return
    memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    result = {
        "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]]),
        "note": f"medians of {args.repeats} alternating runs per way on a shared machine; peak RSS per subprocess",
        "loops": [] if args.skip_loops else loops(args.rounds, args.repeats),
        "aggregation": [] if args.skip_aggregation else aggregation(args.updates, memory_mib),
    }
    print(table(result))
    out = ROOT / "bench" / "results" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from fedmef_core.io import write_text

    write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
