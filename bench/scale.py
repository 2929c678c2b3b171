"""Fast at scale: seconds per round and peak memory of the bare loop vs the Prefect train flow (+MLflow
sqlite) vs the same flow on a local Ray cluster, the peak memory of aggregation alone with ResNet18-sized
updates, streamed vs all in memory, and the time of a SAP training step against a dense one.

    python bench/scale.py [--rounds 8] [--repeats 3] [--ways bare flow ray] [--threads 1 2]
                          [--workloads whole tiny] [--updates 10 100 1000] [--sap-reps 5]
                          [--skip-loops] [--skip-aggregation] [--skip-sap]

Loops: FedAvg, small CNN, 1 local epoch, batch 32, iid shards, at (clients, clients per round) in
{(100, 10), (1000, 100)}, two workloads: `whole`, the whole Fashion-MNIST training set split over the
clients (600 / 60 samples a client: the workload of the issue that set the targets), and `tiny`, 20 samples
a client (one batch: a client trains for ~20 ms, so the fixed costs per client and per round show the most);
s/round is the steady state, from the end of
round 1 to the end of round R (bare loop: its round callback; flows: the MLflow timestamps of each round's
metrics), so it counts everything a round does — training, exchange, aggregation, checkpoints, tracking —
but not start-up or round 1's first calls (Ray: worker start, ~10 s); `--repeats` alternating runs of each
way, the median reported (the machine is shared: the same loop drifts by 10-20% over minutes). Bare and flow train
one client at a time with `--threads` torch threads (each value its own rows: 1, one thread a client, leaves a
core of this machine to Prefect's API server, which works ~25 ms per task run; 2 shares both cores with it);
the Ray way (threads 1 only) runs `runtime.workers: 2` waves at a time on a local cluster of 2 CPUs, a
thread each (so on a 2-core machine it may beat the bare loop). Aggregation: the
FedAvg `Aggregator` fed K synthetic ResNet18 state dicts through `RoundResults` (one alive at a time) vs
the same K state dicts built in a list first and averaged (as before streaming), K in {10, 100, 1000};
the list way is skipped where K updates would not fit in memory. SAP step: one training step (forward,
backward, SGD) at batch 64, 3x32x32, of ResNet18 and MobileNetV2 three ways timed in turn (median of
`--sap-reps`): dense FedAvg with BatchNorm, FedMef's sparse NSConv model without SAP, and FedMef's default
(SAP on), on 1 thread and on every core; with the fraction of activation entries SAP really kept and its
largest deviation, per layer, from what it should keep (1 - gamma, or every non-zero when fewer). Every
measurement runs in a subprocess of its own; peak RSS is that process's ``ru_maxrss`` (Prefect's temporary
API server and Ray's workers, separate processes, are not counted). Prints tables and writes
bench/results/scale.json.
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
import fedmef_core  # noqa: E402,F401 - first: it sets how torch uses the CPU before torch loads (fedmef_core.cpu)

SHAPES = [(100, 10), (1000, 100)]
WAYS = ["bare", "flow", "ray"]
SAP_ARCHS = ["resnet18", "mobilenetv2"]
WORKLOADS = {"whole": None, "tiny": 20}  # samples a client (None: the whole training set split over the clients)
UPDATE_COUNTS = [10, 100, 1000]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def loop_config(work: Path, clients: int, per_round: int, rounds: int, way: str = "bare",
                samples: int | None = WORKLOADS["tiny"], threads: int = 1):
    """The loops' experiment: `samples` a client (None: the whole training set split over the clients)."""
    from fedmef_core.config import parse_config
    from fedmef_core.tiny import tiny_raw

    raw = tiny_raw(work)
    raw["data"].update(train_limit=None if samples is None else clients * samples, test_limit=1000)
    raw["partition"] = {"scheme": "iid", "seed": 1}
    raw["federation"].update(num_clients=clients, clients_per_round=per_round, min_clients=1, rounds=rounds,
                             local_epochs=1, batch_size=32)
    raw["runtime"].update(checkpoint_every=rounds, eval_every=rounds, threads=threads)
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "scale"}
    if way == "ray":
        raw["runtime"].update(runner="ray", workers=2)
        raw["ray"] = {"local_cpus": 2, "num_cpus": 1}
    return parse_config(raw)


class TrainingClock:
    """Times every client's training (`run_client`, where the bare loop and the flow's in-process waves call
    it): the time a round spends outside it is what the loop around the clients costs. (Not for Ray: its
    clients train in other processes.)"""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []  # (end, seconds), wall clock

    def install(self) -> TrainingClock:
        import fedmef_core.executors as executors
        import tasks.clients as clients

        for module in (executors, clients):
            module.run_client = self._timed(module.run_client)
        return self

    def _timed(self, run_client):
        def timed(*args, **kwargs):
            start = time.time()
            try:
                return run_client(*args, **kwargs)
            finally:
                end = time.time()
                self.calls.append((end, end - start))

        return timed

    def seconds(self, after: float, until: float) -> float:
        """Training seconds of the calls that ended in (after, until]."""
        return sum(s for end, s in self.calls if after < end <= until)


def timed_rounds(config, parts: list | None = None, clock: TrainingClock | None = None) -> dict:
    """How long `config`'s rounds take: ``s_per_round``, the steady state from the end of round 1 to the end
    of round R (the first round pays start-up and first-call costs: Ray's workers, ~10 s), and
    ``first_round_s``, round 1 with the start-up. With `parts` the bare `fedmef_core` loop runs on them (its
    round callback times them); without, the train flow does (the MLflow timestamps of each round's metrics:
    tracking must be on). With `clock` also ``train_s_per_round``, the clients' training in those rounds."""
    import flows  # noqa: F401 - quiet Prefect defaults
    from fedmef_core.data import load_dataset
    from fedmef_core.device import resolve_device
    from fedmef_core.engine import Server, run_rounds

    if parts is not None:
        train, test = load_dataset(config.data)
        server = Server(config, train, test, parts, resolve_device(config.runtime.device))
        ends = [time.time()]
        run_rounds(server, checkpoint_dir=config.runtime.checkpoints_dir,
                   on_round=lambda rnd, metrics: rnd and ends.append(time.time()))
    else:
        from mlflow import MlflowClient

        from flows.train import train_flow

        started = time.time()
        run_id = train_flow(config)["mlflow_run_id"]
        history = MlflowClient(config.tracking.mlflow_uri).get_metric_history(run_id, "train_loss")
        ends = [started] + [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
    rounds = len(ends) - 2
    timed = {"s_per_round": (ends[-1] - ends[1]) / rounds, "first_round_s": ends[1] - ends[0]}
    if clock is not None:
        timed["train_s_per_round"] = clock.seconds(ends[1], ends[-1]) / rounds
    return timed


def run_loop(way: str, workload: str, clients: int, per_round: int, rounds: int, threads: int) -> dict:
    """One way's seconds per round (this process), training with `threads` torch threads."""
    from fedmef_core.tiny import save_partition_of

    with tempfile.TemporaryDirectory(prefix="fedmef-scale-") as tmp:
        config = loop_config(Path(tmp), clients, per_round, rounds, way, WORKLOADS[workload], threads)
        parts = save_partition_of(config)
        clock = TrainingClock().install() if way != "ray" else None
        return {**timed_rounds(config, parts if way == "bare" else None, clock), "peak_rss_mib": peak_rss_mib()}


def run_aggregation(way: str, count: int) -> dict:
    """Peak memory of aggregating `count` ResNet18-sized FedAvg updates (this process)."""

    from fedmef_core.aggregation import weighted_average
    from fedmef_core.algorithms import ClientResult
    from fedmef_core.algorithms.base import Aggregator, FederatedAlgorithm
    from fedmef_core.algorithms.records import ServerState
    from fedmef_core.config import ModelConfig, parse_config
    from fedmef_core.executors import RoundResults
    from fedmef_core.models import build_model
    from fedmef_core.tiny import tiny_raw

    model = build_model(ModelConfig(arch="resnet18", norm="batch"), 3, 10, 32)
    base = model.state_dict()

    def update(c: int) -> ClientResult:  # cheap synthetic weights, different per client
        state = {k: (v + (c % 7) * 1e-3) if v.is_floating_point() else v.clone() for k, v in base.items()}
        return ClientResult(client_id=c, num_samples=10 + c % 5, state=state, train_loss=0.0, steps=1)

    start = time.perf_counter()
    if way == "streaming":
        results = RoundResults.fetched(range(count), update)
        aggregator = Aggregator(FederatedAlgorithm(parse_config(tiny_raw())), 1, model, ServerState())
        for r in results:
            aggregator.add(r)
            del r
        aggregator.finish(model, ServerState())
    else:
        results = [update(c) for c in range(count)]
        model.load_state_dict(weighted_average([r.state for r in results], [r.num_samples for r in results]))
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
            "update_mib": sum(v.numel() * v.element_size() for v in base.values()) / 2**20}


def run_sap_step(arch: str, threads: int, reps: int) -> dict:
    """Step seconds of dense FedAvg, FedMef's model without SAP and FedMef's default, and what SAP kept."""
    import math

    import torch

    from bench.memory import DEFAULT_ROW, DENSE_ROW, NO_SAP_ROW, build, rows, step_times
    from fedmef_core.sap import count_true, keep_mask

    torch.set_num_threads(threads)
    by_name = {row.name: row for row in rows()}
    models = [build(arch, r.norm, r.density, r.sap, torch.device("cpu"))[0]
              for r in (by_name[DENSE_ROW], by_name[NO_SAP_ROW], by_name[DEFAULT_ROW])]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    dense, no_sap, sap = step_times(models, x, y, reps)
    counts = []  # (kept, should keep, entries) per SAP layer call

    def count(module, args):
        a = args[0].detach()
        n = a.numel()
        k = n - math.floor(module.sap.gamma * n + 1e-9)
        counts.append((count_true(keep_mask(a, module.sap.gamma)), min(k, count_true(a.reshape(-1) != 0)), n))

    hooks = [m.register_forward_pre_hook(count) for m in models[2].modules() if getattr(m, "sap", None)]
    models[2](x)
    for h in hooks:
        h.remove()
    return {"arch": arch, "threads": threads, "dense_s": dense, "no_sap_s": no_sap, "sap_s": sap,
            "sap_vs_dense": sap / dense, "sap_vs_no_sap": sap / no_sap,
            "kept_fraction": sum(c[0] for c in counts) / sum(c[2] for c in counts),
            "max_kept_error": max(abs(c[0] - c[1]) / c[2] for c in counts), "sap_layers": len(counts)}


def in_subprocess(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "--one", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loops(rounds: int, repeats: int, ways: list[str], thread_counts: list[int], workloads: list[str],
          earlier: list[dict]) -> list[dict]:
    """The loop rows; a way not run keeps its runs from `earlier` (the last results) in the same row."""
    def key(row: dict) -> tuple:
        return row.get("workload", "tiny"), row["clients"], row["per_round"], row.get("threads", 1)

    last = {key(row): row for row in earlier}
    rows = []
    for workload in workloads:
        for threads in thread_counts:
            for clients, per_round in SHAPES:
                runs = loop_runs(rounds, repeats, [w for w in ways if w != "ray" or threads == 1], threads,
                                 workload, clients, per_round)
                row = {"workload": workload, "samples_per_client": WORKLOADS[workload] or 60_000 // clients,
                       "clients": clients, "per_round": per_round, "threads": threads}
                kept = {w: rs for w, rs in last.get(key(row), {}).get("runs", {}).items() if w not in runs}
                rows.append(summary(row, {**kept, **runs}))
    return rows


def loop_runs(rounds: int, repeats: int, ways: list[str], threads: int, workload: str, clients: int,
              per_round: int) -> dict[str, list[dict]]:
    """`repeats` runs of each way, in turn."""
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for i in range(repeats):  # alternate the ways, so drift hits all alike
        for way in runs:
            runs[way].append(in_subprocess("loop", way, workload, str(clients), str(per_round), str(rounds),
                                           str(threads)))
            print(f"  {workload} N={clients} K={per_round} threads={threads} {way} run {i + 1}: "
                  f"{runs[way][-1]['s_per_round']:.3f} s/round", flush=True)
    return runs


def summary(what: dict, runs: dict[str, list[dict]]) -> dict:
    """The row `what` (workload, shape, threads) with the medians of `runs` (each way's runs) and each way
    against the bare loop."""
    row = dict(what)
    for way in [w for w in WAYS if w in runs]:
        rs = runs[way]
        row[f"{way}_s_per_round"] = statistics.median(r["s_per_round"] for r in rs)
        row[f"{way}_first_round_s"] = statistics.median(r["first_round_s"] for r in rs)
        row[f"{way}_peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        if "train_s_per_round" in rs[0]:  # the time of a round outside the clients' training
            row[f"{way}_train_s_per_round"] = statistics.median(r["train_s_per_round"] for r in rs)
            row[f"{way}_other_s_per_round"] = statistics.median(r["s_per_round"] - r["train_s_per_round"]
                                                               for r in rs)
        if way != "bare" and "bare" in runs:
            row[f"{way}_overhead_pct"] = 100 * (row[f"{way}_s_per_round"] / row["bare_s_per_round"] - 1)
            if f"{way}_other_s_per_round" in row:  # what the way adds outside training, over a bare round
                row[f"{way}_added_outside_training_pct"] = 100 * (
                    row[f"{way}_other_s_per_round"] - row["bare_other_s_per_round"]) / row["bare_s_per_round"]
    return {**row, "runs": runs}


def sap_steps(reps: int) -> list[dict]:
    out = []
    for arch in SAP_ARCHS:
        for threads in sorted({1, os.cpu_count() or 1}):
            out.append(in_subprocess("sap", arch, str(threads), str(reps)))
            print(f"  SAP step {arch} {threads} thread(s): x{out[-1]['sap_vs_dense']:.2f} dense", flush=True)
    return out


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
    for r in result.get("loops", []):
        for way in WAYS:
            if f"{way}_s_per_round" in r:
                over = r.get(f"{way}_overhead_pct")
                seconds = r[f"{way}_s_per_round"]
                other, added = r.get(f"{way}_other_s_per_round"), r.get(f"{way}_added_outside_training_pct")
                lines.append(f"{r.get('workload', 'tiny'):<5} N={r['clients']:<5} K={r['per_round']:<4} "
                             f"threads {r.get('threads', 1)} "
                             f"{way:>5}: {seconds:7.3f} s/round"
                             f"{'' if over is None else f' ({over:+.1f}% vs bare)':<18} "
                             f"{'' if other is None else f'outside training {other:6.3f} s':<26}"
                             f"{'' if added is None else f' ({added:+.1f}% of bare)':<16} "
                             f"round 1 {r.get(f'{way}_first_round_s', float('nan')):6.2f} s  "
                             f"peak RSS {r[f'{way}_peak_rss_mib']:5.0f} MiB")
    if result.get("sap"):
        lines.append(f"{'SAP step, batch 64':<20} {'threads':>7} {'dense s':>8} {'no SAP s':>9} {'SAP s':>7} "
                     f"{'SAP/dense':>9} {'SAP/no SAP':>10} {'kept':>6} {'max dev':>8}")
        for r in result["sap"]:
            lines.append(f"{r['arch']:<20} {r['threads']:>7} {r['dense_s']:>8.3f} {r['no_sap_s']:>9.3f} "
                         f"{r['sap_s']:>7.3f} {r['sap_vs_dense']:>9.2f} {r['sap_vs_no_sap']:>10.2f} "
                         f"{r['kept_fraction']:>6.3f} {r['max_kept_error']:>8.4f}")
    if result.get("aggregation"):
        lines.append(f"{'K (ResNet18 updates)':>21} {'streaming RSS MiB':>18} {'in-memory RSS MiB':>18}")
        for r in result["aggregation"]:
            mem = r["in_memory"]
            lines.append(f"{r['updates']:>21} {r['streaming']['peak_rss_mib']:>18.0f} "
                         f"{mem['peak_rss_mib'] if 'peak_rss_mib' in mem else mem['skipped']:>18}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds a loop runs (s/round: rounds 2 to R)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads a client trains with (each value its own rows; Ray: 1 only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                        help="whole: the training set split over the clients; tiny: 20 samples a client")
    parser.add_argument("--updates", type=int, nargs="+", default=UPDATE_COUNTS,
                        help="numbers of ResNet18-sized updates to aggregate")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=WAYS, help="ways of running the loops")
    parser.add_argument("--sap-reps", type=int, default=5, help="timed SAP/dense steps (after one warm-up)")
    parser.add_argument("--skip-loops", action="store_true")
    parser.add_argument("--skip-aggregation", action="store_true")
    parser.add_argument("--skip-sap", action="store_true")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a single measurement (subprocess)
    args = parser.parse_args()
    if args.one:
        kind, way, *rest = args.one
        if kind == "loop":
            answer = run_loop(way, rest[0], *map(int, rest[1:]))
        elif kind == "sap":
            answer = run_sap_step(way, *map(int, rest))
        else:
            answer = run_aggregation(way, int(rest[0]))
        print(json.dumps(answer))
        return
    memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    out = ROOT / "bench" / "results" / "scale.json"
    last = json.loads(out.read_text()) if out.is_file() else {}  # a skipped part keeps its last results
    command = " ".join(["python", "bench/scale.py", *sys.argv[1:]])
    result = {
        "note": "medians of alternating runs per way; peak RSS per subprocess; `commands`: what made each part",
        "commands": {**last.get("commands", {}), **{part: command for part, skipped in
                     [*((f"loops/{way}", args.skip_loops) for way in args.ways),
                      ("aggregation", args.skip_aggregation), ("sap", args.skip_sap)] if not skipped}},
        "loops": last.get("loops", []) if args.skip_loops else loops(args.rounds, args.repeats, args.ways,
                                                                     args.threads, args.workloads,
                                                                     last.get("loops", [])),
        "aggregation": last.get("aggregation", []) if args.skip_aggregation else aggregation(args.updates,
                                                                                            memory_mib),
        "sap": last.get("sap", []) if args.skip_sap else sap_steps(args.sap_reps),
    }
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    from fedmef_core.io import write_text

    write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
