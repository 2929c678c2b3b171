"""bench.memory's rows: each changes one thing from the row it builds on, and the default row is
exactly what the fedmef config runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.memory import DEFAULT_ROW, FEDDST, attributed, change, rows
from fedmef_core.config import ExperimentConfig


def test_every_row_changes_one_thing_from_an_earlier_row():
    seen: dict = {}
    for row in rows():
        if row.builds_on is not None:
            assert row.builds_on in seen, f"{row.name} builds on a later or unknown row"
            change(row, seen[row.builds_on])  # raises unless exactly one thing changes
        seen[row.name] = row
    assert list(seen)[:3] == ["FedAvg (dense, BN)", FEDDST, "sparse, NSConv, no SAP"]


def test_default_row_is_what_the_fedmef_config_runs():
    config = ExperimentConfig.model_validate({"pruning": {"method": "fedmef"}})
    (default,) = [row for row in rows() if row.name == DEFAULT_ROW]
    assert (default.norm, default.density, default.sap) == (config.model.norm, config.pruning.density, config.sap)
    assert (default.norm, default.sap.positions, default.sap.relu_bitmask) == ("nsconv", "bitmap", True)


def test_dropping_batchnorm_is_its_own_row_before_sap():
    by_name = {row.name: row for row in rows()}
    nsconv = by_name["sparse, NSConv, no SAP"]
    assert nsconv.builds_on == FEDDST and nsconv.sap is None
    sap_rows = [row for row in rows() if row.sap is not None and by_name.get(row.builds_on, row).sap is None]
    assert [row.builds_on for row in sap_rows] == [nsconv.name]  # SAP is switched on once, on NSConv
    assert change(by_name[sap_rows[0].name], nsconv).startswith("SAP on: γ 0.5, values fp16, positions int32")


def test_change_refuses_rows_that_change_two_things():
    default = next(row for row in rows() if row.name == DEFAULT_ROW)
    feddst = next(row for row in rows() if row.name == FEDDST)
    assert change(default, replace(default, norm="batch")) == "norm: BatchNorm → NSConv"
    with pytest.raises(ValueError, match="must change one thing"):
        change(default, feddst)  # NSConv and SAP at once
    with pytest.raises(ValueError, match="must change one thing"):
        change(default, default)


def test_attributed_charges_each_change_to_its_row():
    rows_ = rows()
    footprint = {row.name: 1000 - 100 * i for i, row in enumerate(rows_)}
    measured = {name: {"footprint_bytes": f} for name, f in footprint.items()}
    listed = attributed(rows_, measured)
    assert [r["name"] for r in listed] == [row.name for row in rows_]
    out = {r["name"]: r for r in listed}
    assert out["FedAvg (dense, BN)"]["change_bytes"] is None
    assert out[FEDDST]["below_feddst_pct"] == 0.0
    for row in rows_[1:]:
        assert out[row.name]["change_bytes"] == footprint[row.name] - footprint[row.builds_on]
        assert out[row.name]["below_feddst_pct"] == round(100 * (1 - footprint[row.name] / footprint[FEDDST]), 1)
    assert out[DEFAULT_ROW]["change"] == "ReLU saves: full output → 1-bit mask"
