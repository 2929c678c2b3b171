"""Client updates as Prefect tasks on a real local Ray cluster (2 workers) give the local runner's metrics."""

from __future__ import annotations

import json

import torch

from tests.conftest import prepare_run, uninterrupted_metrics


def test_ray_runner_matches_the_local_runner(prefect_harness, tmp_path):
    from fedmef_core.config import parse_config
    from flows.train import train_flow

    _, config = prepare_run(tmp_path, rounds=2)
    raw = config.model_dump(mode="json")
    raw["runtime"].update(runner="ray", workers=2)
    raw["ray"] = {"address": None, "local_cpus": 2, "num_cpus": 1.0, "num_gpus": 0.0}
    ray_config = parse_config(raw)
    summary = train_flow(ray_config)
    rows = (tmp_path / "metrics" / "rounds.csv").read_text().strip().splitlines()[1:]
    on_ray = [(int(r.split(",")[0]), float(r.split(",")[1]), float(r.split(",")[2])) for r in rows]
    # Ray gives each client num_cpus=1 intra-op thread; CPU kernels sum in a thread-count-dependent order,
    # so the reference runs with the same single thread (then the results are equal bit for bit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = uninterrupted_metrics(config)
    finally:
        torch.set_num_threads(threads)
    assert on_ray == reference
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["accuracy"] == summary["accuracy"]
