"""Time per round three ways: the bare fedmef_core loop, the Prefect train flow with MLflow tracking
(local runner), and the same flow on a local Ray cluster.

    python bench/overhead.py [--rounds 5] [--repeats 2] [--params params.yaml]

Prints a table and writes bench/results/overhead.json. The default experiment's config is used with
`federation.rounds` lowered; every way runs the same rounds, so the comparison is like for like, and
s/round is the steady state from the end of round 1 to the end of the last (`bench.scale.timed_rounds`:
start-up and round 1's first calls are left out; before, they were spread over the rounds). The ways run
in turn, `--repeats` times, and the median is reported: on a shared machine the speed of the
same loop drifts by 10-20% over minutes, as much as the overhead being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import flows  # noqa: E402,F401 - quiet Prefect defaults
from bench.scale import timed_rounds  # noqa: E402
from fedmef_core.config import load_config, parse_config  # noqa: E402
from fedmef_core.data import load_dataset, write_partition  # noqa: E402


def experiment_config(params: str, rounds: int, work: Path, sections: dict | None = None, **runtime):
    """`params`' experiment with `rounds` rounds, its outputs and MLflow store in `work`, and `sections`'
    values (``{"data": {"train_limit": 4000}}``) and `runtime`'s over it."""
    raw = load_config(params).model_dump(mode="json")
    for section, values in (sections or {}).items():
        raw[section].update(values)
    raw["federation"]["rounds"] = rounds
    raw["runtime"].update(
        run_dir=str(work), partitions_dir=str(work / "partitions"), checkpoints_dir=str(work / "ckpt"),
        metrics_dir=str(work / "metrics"), plots_dir=str(work / "plots"), **runtime,
    )
    raw["tracking"]["mlflow_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    return parse_config(raw)


def seconds_per_round(config, bare: bool) -> float:
    """Write the partition the train flow reads (the same split for every way) and time the rounds
    (steady state, see :func:`bench.scale.timed_rounds`) of the bare loop on it, or of the train flow."""
    train, _ = load_dataset(config.data)
    parts, _ = write_partition(config, train.labels.numpy(), train.num_classes)
    return timed_rounds(config, parts if bare else None)["s_per_round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2,
                        help="run the ways in turn this many times and report the median (a shared machine drifts)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    ways = {"bare fedmef_core loop": (True, {}), "Prefect flow + MLflow (local)": (False, {})}
    if not args.skip_ray:
        ways["Prefect flow + MLflow (Ray, 2 workers)"] = (False, {"runner": "ray", "workers": 2})
    samples: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        for rep in range(args.repeats):
            for i, (name, (bare, runtime)) in enumerate(ways.items()):
                config = experiment_config(args.params, args.rounds, work / f"{rep}-{i}", **runtime)
                samples[name].append(seconds_per_round(config, bare))
                print(f"[repeat {rep + 1}/{args.repeats}] {name}: {samples[name][-1]:.2f} s/round", flush=True)
    results = {name: statistics.median(values) for name, values in samples.items()}
    base = results["bare fedmef_core loop"]
    print(f"\n{'way (median of ' + str(args.repeats) + ')':<42}{'s/round':>10}{'vs bare':>10}")
    for name, sec in results.items():
        print(f"{name:<42}{sec:>10.2f}{sec / base - 1:>+10.1%}")
    out = ROOT / "bench" / "results" / "overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "repeats": args.repeats, "seconds_per_round": results,
                               "samples": samples}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
