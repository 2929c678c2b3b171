"""Fast where users run: seconds per round of the reduced default experiment on an idle machine and beside a
busy neighbour, per thread policy (torch threads x OpenMP wait policy).

    python bench/shared_machine.py [--rounds 5] [--repeats 2] [--ways bare flow] [--loads 0 1 2]
                                   [--policies 2:10000 2:300000 2:PASSIVE 2:10000:portable]

The experiment is `params.yaml`'s (FedMef in its paper configuration: NSConv, SAP, BaE, d = 0.1, small CNN),
reduced to 20 clients, 4 a round, on the first 4,000 training and 2,000 test images, adjustments every 2
rounds. `bare` is the fedmef_core loop, `flow` the Prefect train flow with MLflow tracking (local runner).
s/round is the steady state (rounds 2 to R, `bench.scale.timed_rounds`). A load of N is the neighbour this
bench starts itself: N processes spinning a core each (`while True: pass`; 2 = a neighbour's 2-thread job),
started before and stopped after each measurement. Each measurement runs in a subprocess of its own, with the
policy's wait setting in its environment before torch loads (a number: ``GOMP_SPINCOUNT``, spins at a barrier
before sleeping: 300000 is libgomp's default, what torch did before `fedmef_core.cpu`, 10000 the default now;
``PASSIVE``/``ACTIVE``: ``OMP_WAIT_POLICY``, never or always spin), ``runtime.threads`` threads and, when a
third field is given, ``FEDMEF_NUMERICS`` (``portable``: the AVX2 kernels the DVC pipeline runs; the cost of
portable numerics). The loads and policies alternate within each repeat (the policies' order rotating
from one repeat to the next); the median is reported, with
the slow-down against the same policy idle, and both that and the cost against the first policy given
(the reference) as paired ratios with 95% intervals: this VM's timings move 10-20% from one process to the
next, so a few percent shows only paired, over several repeats. Prints a table and writes
bench/results/shared_machine.json (rows measured before and not now are kept, so a run may measure a part of
the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from services.comparison import t_interval  # noqa: E402

REDUCED = {
    "data": {"train_limit": 4000, "test_limit": 2000},
    "federation": {"num_clients": 20, "clients_per_round": 4},
    "pruning": {"adjust_interval": 2},
}
POLICIES = ["2:10000", "2:300000", "2:PASSIVE", "2:10000:portable"]


@contextmanager
def neighbour(busy: int):
    """`busy` processes that each keep a core busy until the block ends."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def run_one(way: str, threads: int, rounds: int) -> dict:
    """This process's measurement (its environment already holds the wait policy)."""
    from bench.overhead import experiment_config, seconds_per_round

    with tempfile.TemporaryDirectory(prefix="fedmef-shared-") as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        sections = {**REDUCED, "pruning": {**REDUCED["pruning"], "adjust_until": rounds}}
        config = experiment_config(str(ROOT / "params.yaml"), rounds, Path(tmp), sections, threads=threads)
        return {"s_per_round": seconds_per_round(config, bare=way == "bare")}


def policy_environment(policy: str) -> dict[str, str]:
    """``THREADS:WAIT[:NUMERICS]`` as environment: WAIT is ``PASSIVE`` or ``ACTIVE`` (OMP_WAIT_POLICY), or a
    number (GOMP_SPINCOUNT: spins at a barrier before sleeping; 300000 is libgomp's own default, what torch did
    before `fedmef_core.cpu`); NUMERICS ``native`` (the default) or ``portable``."""
    _, wait, *numerics = policy.split(":")
    env = {"FEDMEF_NUMERICS": numerics[0] if numerics else "native"}
    env["OMP_WAIT_POLICY" if wait in ("PASSIVE", "ACTIVE") else "GOMP_SPINCOUNT"] = wait
    return env


def measure(way: str, policy: str, busy: int, rounds: int) -> float:
    threads = policy.split(":")[0]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(policy_environment(policy))
    with neighbour(busy):
        out = subprocess.run([sys.executable, __file__, "--one", way, threads, str(rounds)], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["s_per_round"]


def paired_ratio(these: list[float], against: list[float]) -> dict | None:
    """The ratio of two measurements taken in the same repeats: geometric mean of the per-repeat ratios and
    its 95% Student-t interval (on the log scale); a VM's timings drift between processes by 10-20%, so a
    difference of a few percent shows only paired and over several repeats."""
    logs = [math.log(a / b) for a, b in zip(these, against)]
    if len(logs) < 2:
        return None
    iv = t_interval(logs)
    return {"ratio": math.exp(iv.mean), "low": math.exp(iv.low), "high": math.exp(iv.high), "n": iv.n}


def _interval(p: dict | None) -> str:
    return f"{p['ratio']:.3f} [{p['low']:.3f}, {p['high']:.3f}]" if p else "-"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", choices=["bare", "flow"], default=["bare", "flow"])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy neighbour processes")
    parser.add_argument("--policies", nargs="+", default=POLICIES, help="THREADS:OMP_WAIT_POLICY[:FEDMEF_NUMERICS]")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        way, threads, rounds = args.one
        print(json.dumps(run_one(way, int(threads), int(rounds))))
        return
    samples: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        turn = rep % len(args.policies)  # each policy takes each place in a repeat in turn (a drift is shared)
        for way in args.ways:
            for policy in args.policies[turn:] + args.policies[:turn]:
                for busy in args.loads:
                    key = f"{way}|{policy}|{busy}"
                    samples.setdefault(key, []).append(measure(way, policy, busy, args.rounds))
                    print(f"[repeat {rep + 1}/{args.repeats}] {way:5s} threads:wait {policy:10s} busy {busy}: "
                          f"{samples[key][-1]:.2f} s/round", flush=True)
    out = ROOT / "bench" / "results" / "shared_machine.json"
    last = json.loads(out.read_text()) if out.is_file() else {}
    reference = args.policies[0]
    rows = []
    for way in args.ways:
        for policy in args.policies:
            idle = samples.get(f"{way}|{policy}|0")
            for busy in args.loads:
                these = samples[f"{way}|{policy}|{busy}"]
                row = {"way": way, "policy": policy, "busy": busy, "s_per_round": statistics.median(these),
                       "vs_idle": None, "rounds": args.rounds, "repeats": args.repeats,
                       "command": " ".join(["python", "bench/shared_machine.py", *sys.argv[1:]])}
                if idle:
                    row["vs_idle"] = row["s_per_round"] / statistics.median(idle)
                    row["vs_idle_paired"] = paired_ratio(these, idle)
                if policy != reference:
                    row["reference"] = reference
                    row["vs_reference"] = paired_ratio(these, samples[f"{way}|{reference}|{busy}"])
                rows.append(row)
    measured = {(r["way"], r["policy"], r["busy"]) for r in rows}
    rows = [r for r in last.get("rows", []) if (r["way"], r["policy"], r["busy"]) not in measured] + rows
    rows.sort(key=lambda r: (r["way"] != "bare", r["policy"], r["busy"]))
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores; medians, and paired ratios (geometric mean of the "
             f"repeats' ratios [95% interval]): x idle against the same policy idle, x ref against {reference} "
             "at the same load (see each row's repeats in the JSON)",
             f"{'way':6s} {'threads:wait':17s} {'busy cores':>10s} {'s/round':>8s} {'x idle':>7s} "
             f"{'x idle, paired':>22s} {'x ref, paired':>22s}"]
    for r in rows:
        ratio = f"{r['vs_idle']:.2f}" if r["vs_idle"] else "-"
        lines.append(f"{r['way']:6s} {r['policy']:17s} {r['busy']:>10d} {r['s_per_round']:>8.2f} {ratio:>7s} "
                     f"{_interval(r.get('vs_idle_paired')):>22s} {_interval(r.get('vs_reference')):>22s}")
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "rows": rows,
                               "samples": {**last.get("samples", {}), **samples}}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
