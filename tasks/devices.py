"""What a run with device budgets reports: the assignment and each tier's fit at the start, per round who
trained (`metrics/devices.csv`, a row per sampled client), and at the end each tier's participation and how well
the final model serves its data (`metrics/devices.json`, MLflow `devices/`, a participation plot, a Prefect table
artifact)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fedmef_core.config import ExperimentConfig
from fedmef_core.devices import Fleet
from fedmef_core.engine import Server
from fedmef_core.io import write_json, write_text
from fedmef_core.names import metric_key
from fedmef_core.plots import plot_participation
from fedmef_core.runs import RunPaths
from services.tracking.tracker import Tracker

ROW_COLUMNS = ("round", "client_id", "tier", "budget_mib", "status", "batch_size", "micro_batch", "gamma",
               "predicted_mib", "held_mib")


class DeviceReporter:
    """Reports a run's devices (module doc); does nothing when devices are unlimited."""

    def __init__(self, config: ExperimentConfig, paths: RunPaths, tracker: Tracker, server: Server):
        self.config, self.paths, self.tracker, self.fleet = config, paths, tracker, server.fleet
        self.csv = paths.metrics / "devices.csv"
        self.rows: list[dict] = []
        if self.fleet is None:  # an earlier experiment's devices files in this folder are not this run's
            for path in self.outputs:
                path.unlink(missing_ok=True)
            return
        self.rows = [r for r in _read_rows(self.csv) if int(r["round"]) <= server.round]  # a resume's own rounds
        write_text(self.csv, _rows_csv(self.rows))
        print(describe_fleet(self.fleet), flush=True)

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The files only a run with device budgets writes."""
        return self.csv, self.paths.metrics / "devices.json", self.paths.plots / "participation.png"

    def __call__(self, server: Server) -> None:
        """After a round: append its per-client rows."""
        if self.fleet is None:
            return
        self.rows += server.device_rows
        write_text(self.csv, _rows_csv(self.rows))

    def finish(self, server: Server) -> dict:
        """The run's devices summary (also `metrics/devices.json`, MLflow, the plot and the Prefect table)."""
        if self.fleet is None:
            return {}
        fleet, rounds = self.fleet, self.config.federation.rounds
        accuracy = fleet.tier_accuracy(server.last_eval.per_class_accuracy) if server.last_eval else {}
        tiers = []
        for row in fleet.tier_table():
            mine = [r for r in self.rows if r["tier"] == row["tier"]]
            counts = {s: sum(r["status"] == s for r in mine) for s in ("trained", "excluded", "over_budget",
                                                                       "dropped")}
            held = [float(r["held_mib"]) for r in mine if r["held_mib"] not in ("", None)]
            tiers.append({**row, "sampled": len(mine), **counts,
                          "participation": counts["trained"] / len(mine) if mine else 0.0,
                          "held_mib_max": max(held) if held else None,
                          "accuracy_on_its_data": accuracy.get(row["tier"])})
        sampled = sum(t["sampled"] for t in tiers)
        summary = {"assignment": fleet.assignment.digest(), "policy": self.config.devices.policy,
                   "bound": self.config.devices.bound,
                   "participation": sum(t["trained"] for t in tiers) / sampled if sampled else 0.0,
                   "over_budget": sum(t["over_budget"] for t in tiers), "tiers": tiers}
        _, summary_json, plot = self.outputs
        write_json(summary_json, {**summary, "clients": fleet.assignment.to_dict()["clients"]})  # tiers: the summary's
        plot_participation(self.rows, fleet.assignment.tiers, plot,
                           title=f"{self.config.pruning.method}: who trained ({self.config.devices.policy})")
        metrics = {metric_key("devices", "participation"): summary["participation"]}
        for t in tiers:
            metrics[metric_key("devices", t["tier"], "participation")] = t["participation"]
            if t["accuracy_on_its_data"] is not None:
                metrics[metric_key("devices", t["tier"], "accuracy")] = t["accuracy_on_its_data"]
        self.tracker.log_metrics(metrics, step=rounds)
        for path, where in [(self.csv, "devices"), (summary_json, "devices"), (plot, "plots")]:
            self.tracker.log_artifact(path, where)
        _table_artifact(tiers)
        return summary


def describe_fleet(fleet: Fleet) -> str:
    """One line per tier: clients, budget and how they train."""
    lines = [f"devices: {fleet.config.devices.policy} under a {fleet.config.devices.bound} budget"]
    for t in fleet.tier_table():
        how = (f"batch {t['batch_size']}" + (f" in micro-batches of {t['micro_batch']}" if t["micro_batch"] else "")
               + (f", SAP gamma {t['gamma']:g}" if t["gamma"] is not None else "")
               + f", {t['predicted_mib']:.2f} MiB") if t["fits"] else \
            f"cannot train (needs {t['predicted_mib']:.2f} MiB at batch {t['batch_size']})"
        lines.append(f"  {t['tier']}: {t['clients']} clients at {t['budget_mib']} MiB -> {how}")
    return "\n".join(lines)


def _table_artifact(tiers: list[dict]) -> None:
    """The tiers' participation as a Prefect table artifact (on the flow run's page), when in a flow run."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    columns = ("tier", "budget_mib", "clients", "sampled", "trained", "excluded", "over_budget", "participation",
               "batch_size", "micro_batch", "gamma", "predicted_mib", "held_mib_max", "accuracy_on_its_data")
    table = [{k: (round(t[k], 4) if isinstance(t[k], float) else t[k]) for k in columns} for t in tiers]
    create_table_artifact(table, key="device-participation",
                          description="Per device tier: who could train, at which batch and SAP gamma, and how "
                          "well the final model serves its data")


def _rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROW_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
