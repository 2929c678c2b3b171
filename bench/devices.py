"""Memory-limited devices: which method lets the small ones train, and what that does to the model.

A mixed population on Fashion-MNIST with the small CNN (bench.accuracy's --medium data and clients, d = 0.1):
40% of the clients have 8 MiB, 30% 13.5 MiB, 30% 64 MiB — budgets set between the methods' footprints at batch
32 (FedMef with SAP 7.7 MiB; FedDST / FedTiny 13.1; dense FedAvg 14.4), so the tiers bind. The small devices
hold the clients whose data lean most on classes 0-4 (``devices.correlate: labels``), so leaving them out costs
accuracy on their data. Each method runs under ``exclude`` (a client that does not fit is not trained) and
``fit_batch`` (it trains at the largest batch that fits), for every seed, in the bare round loop (no MLflow).

Reported per (policy, method): participation (trained / sampled clients), the test accuracy averaged over the
last 5 evaluated rounds, the final model's accuracy on each tier's data (per-class test accuracy weighted by the
tier's label mix), clients over budget while training (enforcement: must be 0), and FedMef minus each baseline,
paired by seed, with a 95% t-interval.

    python -m bench.devices                   # 30 rounds, 3 seeds (about 40 min on 2 CPU cores)
    python -m bench.devices --rounds 15       # shorter

Writes ``bench/results/devices.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.accuracy import COMMON, MEDIUM
from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset, partition_indices
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_rounds
from fedmef_core.evaluation import mean_of_last
from services.comparison import t_interval

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["fedmef", "feddst", "fedtiny", "fedavg"]
POLICIES = ["exclude", "fit_batch"]
TIERS = [{"name": "small", "memory_mib": 8, "share": 0.4}, {"name": "medium", "memory_mib": 13.5, "share": 0.3},
         {"name": "large", "memory_mib": 64, "share": 0.3}]


def config_for(method: str, policy: str, seed: int, rounds: int):
    raw: dict = {section: dict(values) for section, values in COMMON.items() if section != "tracking"}
    for section, values in MEDIUM.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["federation"] = {**raw["federation"], "rounds": rounds}
    raw["pruning"] = {**raw["pruning"], "method": method, "density": 0.1,
                      "adjust_until": min(raw["pruning"]["adjust_until"], rounds - 1)}
    raw["devices"] = {"profile": "tiers", "tiers": TIERS, "correlate": "labels", "policy": policy}
    raw["tracking"] = {"enabled": False}
    raw["seed"] = seed
    return parse_config(raw)


def run_cell(method: str, policy: str, seed: int, rounds: int) -> dict:
    config = config_for(method, policy, seed, rounds)
    train, test = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    server = Server(config, train, test, parts, resolve_device("cpu"))
    started = time.perf_counter()
    history = run_rounds(server)
    fleet = server.fleet
    sampled = sum(h["devices/sampled"] for h in history)
    per_tier = {}
    for t in fleet.tier_table():
        tier = t["tier"]
        s = sum(h[f"devices/{tier}/sampled"] for h in history)
        per_tier[tier] = {"participation": sum(h[f"devices/{tier}/trained"] for h in history) / s if s else None,
                          "batch_size": t["batch_size"] if t["fits"] else None}
    for tier, acc in fleet.tier_accuracy(server.last_eval.per_class_accuracy).items():
        per_tier[tier]["accuracy"] = acc
    return {"method": method, "policy": policy, "seed": seed, "score": mean_of_last(history, 5),
            "participation": sum(h["devices/trained"] for h in history) / sampled,
            "over_budget": sum(h["devices/over_budget"] for h in history), "tiers": per_tier,
            "seconds": round(time.perf_counter() - started, 1)}


def _cells(cells: list[dict], policy: str, method: str) -> list[dict]:
    """One (policy, method)'s cells in seed order."""
    return sorted((c for c in cells if c["policy"] == policy and c["method"] == method), key=lambda c: c["seed"])


def summarise(cells: list[dict]) -> dict:
    out: dict = {}
    for policy in POLICIES:
        rows = {}
        for method in METHODS:
            mine = _cells(cells, policy, method)
            if not mine:
                continue
            tiers = mine[0]["tiers"].keys()
            rows[method] = {
                "accuracy": statistics.fmean(c["score"] for c in mine),
                "per_seed": [c["score"] for c in mine],
                "participation": statistics.fmean(c["participation"] for c in mine),
                "over_budget": sum(c["over_budget"] for c in mine),
                "tiers": {t: {"accuracy": statistics.fmean(c["tiers"][t]["accuracy"] for c in mine),
                              "participation": statistics.fmean(
                                  [c["tiers"][t]["participation"] for c in mine
                                   if c["tiers"][t]["participation"] is not None] or [0.0]),
                              "batch_size": mine[0]["tiers"][t]["batch_size"]} for t in tiers},
            }
        paired = {}
        for other in METHODS[1:]:
            if "fedmef" in rows and other in rows:
                diffs = tuple(a - b for a, b in zip(rows["fedmef"]["per_seed"], rows[other]["per_seed"]))
                small = tuple(a["tiers"]["small"]["accuracy"] - b["tiers"]["small"]["accuracy"]
                              for a, b in zip(_cells(cells, policy, "fedmef"), _cells(cells, policy, other)))
                paired[other] = {"differences": diffs, "interval": _interval(diffs),
                                 "small_tier_differences": small, "small_tier_interval": _interval(small)}
        out[policy] = {"methods": rows, "fedmef_minus": paired}
    return out


def _interval(values: tuple[float, ...]) -> list[float]:
    """[mean, low, high] of the 95% t-interval."""
    i = t_interval(values)
    return [i.mean, i.low, i.high]


def table(summary: dict) -> str:
    lines = []
    for policy, block in summary.items():
        lines.append(f"\npolicy {policy}: accuracy = mean of the last 5 rounds; per tier: participation, batch, "
                     "accuracy on its data")
        lines.append(f"{'method':<8} {'acc':>6} {'part.':>6} {'over':>4}  " + "  ".join(
            f"{t:>22}" for t in next(iter(block["methods"].values()))["tiers"]))
        for method, r in block["methods"].items():
            tiers = "  ".join(f"{t['participation']:>5.0%} b{t['batch_size'] or '-':>3} {t['accuracy']:.3f}".rjust(22)
                              for t in r["tiers"].values())
            lines.append(f"{method:<8} {r['accuracy']:6.3f} {r['participation']:6.0%} {r['over_budget']:>4}  {tiers}")
        for other, p in block["fedmef_minus"].items():
            lo, hi = p["interval"][1], p["interval"][2]
            slo, shi = p["small_tier_interval"][1], p["small_tier_interval"][2]
            lines.append(f"  fedmef - {other:<7}: {100 * p['interval'][0]:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                         f"points; on the small tier's data {100 * p['small_tier_interval'][0]:+.1f} "
                         f"[{100 * slo:+.1f}, {100 * shi:+.1f}]")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=MEDIUM["federation"]["rounds"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    parser.add_argument("--out", type=Path, default=RESULTS / "devices.json")
    args = parser.parse_args()
    cells = []
    for seed in range(args.seeds):
        for policy in args.policies:
            for method in args.methods:
                cell = run_cell(method, policy, seed, args.rounds)
                cells.append(cell)
                print(f"seed {seed} {policy:<9} {method:<7} accuracy {cell['score']:.4f} participation "
                      f"{cell['participation']:.0%} over budget {cell['over_budget']} ({cell['seconds']} s)",
                      flush=True)
    summary = summarise(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "seeds": args.seeds, "tiers": TIERS,
                                    "summary": summary, "cells": cells}, indent=1))
    print(table(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
