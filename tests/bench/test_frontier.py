"""`bench/frontier.py` end to end on a tiny grid (real sweeps, real sqlite MLflow): every cell has the schema the
README's frontier rests on, the budget is a fraction of dense FedAvg's footprint, the same for every method, and
the differences are FedMef minus every other (method, arm), paired by seed, Holm-adjusted over the family."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from services.comparison import holm
from tests.conftest import tiny_raw

TINY = ["data.train_limit=600", "data.test_limit=200", "federation.num_clients=6", "federation.clients_per_round=3",
        "federation.rounds=2", "pruning.adjust_interval=1", "pruning.adjust_until=2"]
CELL_KEYS = {"method", "arm", "norm", "policy", "budget_fraction", "budget_mib", "seed", "accuracy_mean_last5",
             "participation", "seconds_per_round", "steps_per_round", "samples_per_round", "bytes_per_round"}


def test_a_tiny_frontier_writes_its_cells_and_paired_differences(prefect_harness, tmp_path):
    from bench.frontier import main

    raw = tiny_raw()
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "frontier.json"
    result = main(["--quick", "--methods", "fedavg", "fedmef", "--budgets", "0.3", "1", "--seeds", "2",
                   "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path / "runs"), "--out", str(out),
                   "--jobs", "1", *(a for s in TINY for a in ("--set", s))])
    saved = json.loads(out.read_text())
    assert saved["cells"] == result["cells"] and out.with_suffix(".png").is_file()
    cells = saved["cells"]
    assert len(cells) == 2 * 2 * 2 * 2  # arms x methods x budgets x seeds
    assert all(CELL_KEYS <= c.keys() for c in cells)
    assert {(c["arm"], c["method"], c["norm"]) for c in cells} == {
        ("paper", "fedavg", "batch"), ("paper", "fedmef", "nsconv"),
        ("nsconv", "fedavg", "nsconv"), ("nsconv", "fedmef", "nsconv")}
    for budget in (0.3, 1.0):  # one rule: the same MiB for every method and arm
        assert len({c["budget_mib"] for c in cells if c["budget_fraction"] == budget}) == 1
    small, whole = (next(c["budget_mib"] for c in cells if c["budget_fraction"] == b) for b in (0.3, 1.0))
    assert abs(small / whole - 0.3) < 1e-9
    assert all(c["policy"] == "accumulate" and c["steps_per_round"] > 0 and c["seconds_per_round"] > 0
               for c in cells)
    diffs = saved["differences"]
    assert {(d["method"], d["arm"], d["budget_fraction"]) for d in diffs} == {
        (m, a, b) for m, a in (("fedavg", "paper"), ("fedavg", "nsconv"), ("fedmef", "nsconv")) for b in (0.3, 1.0)}
    assert [d["p_holm"] for d in diffs] == holm([d["p"] for d in diffs])
    for d in diffs:
        by_seed = {c["seed"]: c["accuracy_mean_last5"] for c in cells
                   if (c["method"], c["arm"], c["budget_fraction"]) == (d["method"], d["arm"], d["budget_fraction"])}
        fedmef = {c["seed"]: c["accuracy_mean_last5"] for c in cells
                  if (c["method"], c["arm"], c["budget_fraction"]) == ("fedmef", "paper", d["budget_fraction"])}
        assert d["differences"] == [fedmef[s] - by_seed[s] for s in (0, 1)]
    assert Path(cells[0]["run_dir"]).is_dir()
