"""A sweep: methods x densities x seeds, every cell one experiment in its own run folder, all under one
MLflow parent run.

- `SweepSpec` is the sweep's request (the CLI's arguments, the Prefect UI's form), validated once.
- `plan_cells` turns it into cells: the config of each is `params.yaml` + the shared overrides + the
  method's own overrides + method, density and seed (the config's top-level `seed`, which `federation.seed`
  and `partition.seed` follow, so one seed is one draw of the whole experiment). A cell's run folder is
  `<root>/<run_name>`; its partition is `<root>/partitions/<digest of data, partition, num_clients>`, shared by
  every cell that splits the same data the same way — so all methods of one seed train on the same shards,
  sample the same clients and start from the same `federation.seed`. A dense method (fedavg) runs at density
  1.0 whatever the grid says: its cells at several densities are one experiment, run once.
- `pending_steps` says what a cell still needs (a cell is finished when its run folder holds `final.pt` of
  the same config and `train.json` and `eval.json` written after it), so a re-run skips finished cells and
  `train` resumes a half-done one from its own checkpoints.
- `parent_run` finds the sweep's parent run again by name + grid digest (a re-run reuses it), or creates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedmef_core.checkpoint import FINAL_NAME, CheckpointError, load_checkpoint
from fedmef_core.config import (
    SEEDED_SECTIONS,
    ConfigError,
    ExperimentConfig,
    PruningMethod,
    TrackingConfig,
    UserPath,
    identity_of,
    load_config,
    method_traits,
    no_booleans_for_numbers,
)
from fedmef_core.evaluation import mean_of_last
from fedmef_core.io import read_record
from fedmef_core.names import folder_name
from fedmef_core.planner import MIB, ClientStep, Policy, predict, profile_config
from fedmef_core.runs import read_eval_metrics, read_run_facts, run_name, run_paths
from services.comparison import CellResult
from services.tracking.tracker import Tracker, ended, filter_value, git_commit, prefect_flow_run_id, store_failures

Density = Annotated[float, Field(gt=0, le=1)]
BudgetFraction = Annotated[float, Field(gt=0, le=1)]  # of the dense model's footprint


class SweepSpec(BaseModel):
    """What to sweep: every combination of `methods`, `densities` and `seeds`, on top of `params`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    methods: list[PruningMethod] = Field(
        ["fedavg", "fedtiny", "fedmef"], min_length=1, description="Federated (pruning) methods to compare."
    )
    densities: list[Density] = Field([0.1], min_length=1, description="Densities d of the sparse methods.")
    seeds: list[int] = Field(
        [0], min_length=1, description="Seeds: a cell's top-level seed (its federation.seed and partition.seed)."
    )
    reference: PruningMethod | None = Field(
        None, description="Paired differences are method minus this one (default: fedtiny if swept, else the first)."
    )
    overrides: dict[str, Any] = Field(
        {}, description="section.key -> value for every cell, on top of params, e.g. {\"federation.rounds\": 5}."
    )
    method_overrides: dict[PruningMethod, dict[str, Any]] = Field(
        {}, description="method -> {section.key: value} for that method's cells only, e.g. "
        "{\"fedmef\": {\"pruning.bae_lambda\": 1.0}}."
    )
    budgets: list[BudgetFraction] | None = Field(
        None, min_length=1,
        description="Memory budgets as fractions of the dense model's footprint (dense FedAvg's client step at the "
        "configured batch, weights + saved activations: the same MiB for every method of a cell): every client of "
        "a cell has that budget. null: no budget axis (devices as params says).",
    )
    policy: Policy = Field(
        "accumulate",
        description="How a client fits a cell's budget (devices.policy), one rule for every method stated before "
        "any run: accumulate keeps every method's batch and steps (method_overrides may set another per method).",
    )
    params: UserPath = Field("params.yaml", description="The experiment config every cell starts from.")
    name: str | None = Field(None, description="Name of the MLflow parent run (default: sweep-<grid digest>).")
    jobs: int = Field(1, ge=1, description="Cells trained at the same time (threads of this process).")
    root: UserPath = Field("runs", description="Folder of the cells' run folders and of the shared partitions.")

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return no_booleans_for_numbers(cls, value, info)

    @field_validator("name")
    @classmethod
    def _name_is_one_folder_mlflow_finds(cls, name: str | None) -> str | None:
        """The name is a folder, `<root>/sweeps/<name>`, and what a re-run finds its parent run by."""
        if name is not None:
            filter_value(folder_name(name, "the sweep's name"))
        return name

    @model_validator(mode="after")
    def _reference_is_swept(self) -> SweepSpec:
        if self.reference is not None and self.reference not in self.methods:
            raise ValueError(f"reference {self.reference!r} is not among the methods {self.methods}; add it or "
                             "choose one of them")
        return self

    @property
    def reference_method(self) -> str:
        if self.reference is not None:
            return self.reference
        return "fedtiny" if "fedtiny" in self.methods else self.methods[0]


def parse_spec(raw: dict[str, Any]) -> SweepSpec:
    """Validate a sweep request; a mistake is one `ConfigError` naming every bad field."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"- {'.'.join(map(str, e['loc'])) or 'sweep'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise ConfigError("the sweep is invalid:\n" + "\n".join(lines)) from None


@dataclass(frozen=True)
class Cell:
    """One grid point: `density` is the grid's; `config` is what runs (a dense method's says 1.0); `budget`: the
    budget fraction of the dense footprint every client has (None: no budget axis)."""

    method: str
    density: float
    seed: int
    config: ExperimentConfig
    budget: float | None = None

    @property
    def name(self) -> str:
        return run_name(self.config)

    @property
    def dense(self) -> bool:
        return not method_traits(self.method).sparse


def _digest(obj: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def partition_key(config: ExperimentConfig) -> str:
    """Digest of what decides the split: cells with the same one share a partition folder."""
    return _digest({"data": config.data.model_dump(mode="json"), "partition": config.partition.model_dump(mode="json"),
                    "num_clients": config.federation.num_clients})


def _placed(config: ExperimentConfig, root: str, jobs: int) -> ExperimentConfig:
    """The cell's own run folder, the shared partition folder and its share of the cores, `jobs` cells training
    at once (runtime settings: not part of the identity)."""
    rt = config.runtime
    runtime = rt.model_copy(update={
        "run_dir": str(Path(root) / run_name(config)),
        "partitions_dir": str(Path(root) / "partitions" / partition_key(config)),
        "threads": cell_threads(rt.threads, jobs),
    })
    placed = config.model_copy(update={"runtime": runtime})
    run_paths(placed)  # refuses an output folder outside the cell's run folder (shared by every cell)
    return placed


FOLLOW_SEED = {f"{name}.seed": None for name in SEEDED_SECTIONS}  # whatever params.yaml says: the cell's seed


BUDGET_TIER = "budget"  # the one device tier of a cell with a budget


def dense_footprint_mib(spec: SweepSpec, seed: int) -> float:
    """What a client of dense FedAvg with its own normalisation (BatchNorm) holds for one step at the configured
    batch (weights + saved activations, the planner's figure on standard normal images: dense, without SAP, it does
    not depend on the data): the MiB a cell's budget fraction is a fraction of, the same for every method and for
    a sweep that gives every method another normalisation."""
    dense = load_config(spec.params, {**spec.overrides, "pruning.method": "fedavg", "model.norm": "auto",
                                      "seed": seed, **FOLLOW_SEED, "devices.profile": "none"})
    return predict(profile_config(dense), ClientStep.of(dense)).footprint_bytes / MIB


def _budget_overrides(spec: SweepSpec, budget: float | None, dense_mib: float) -> dict[str, Any]:
    if budget is None:
        return {}
    tier = {"name": BUDGET_TIER, "memory_mib": budget * dense_mib, "share": 1.0}
    return {"devices.profile": "tiers", "devices.tiers": [tier], "devices.policy": spec.policy,
            "devices.correlate": "none"}


def plan_cells(spec: SweepSpec) -> list[Cell]:
    """Every (method, density, budget, seed) with its validated config, in grid order."""
    cells = []
    dense_mib = dense_footprint_mib(spec, spec.seeds[0]) if spec.budgets else 0.0
    for method in spec.methods:
        for density in spec.densities:
            for budget in spec.budgets or [None]:
                for seed in spec.seeds:
                    overrides = {**spec.overrides, **_budget_overrides(spec, budget, dense_mib),
                                 **spec.method_overrides.get(method, {}), "pruning.method": method,
                                 "pruning.density": density, "seed": seed, **FOLLOW_SEED}
                    where = f"{method} d={density:g}" + (f" budget {budget:g}" if budget else "") + f" seed {seed}"
                    try:
                        config = load_config(spec.params, overrides)
                    except ConfigError as exc:
                        raise ConfigError(f"sweep cell {where}: {exc}") from None
                    cells.append(Cell(method, density, seed, _placed(config, spec.root, spec.jobs), budget))
    return cells


def experiments(cells: list[Cell]) -> list[Cell]:
    """The distinct experiments among the cells (dense cells at several densities are one)."""
    return list({c.name: c for c in reversed(cells)}.values())[::-1]


def partitions(cells: list[Cell]) -> list[ExperimentConfig]:
    """One config per distinct partition folder."""
    return list({c.config.runtime.partitions_dir: c.config for c in cells}.values())


def grid_digest(spec: SweepSpec, cells: list[Cell]) -> str:
    """What makes two sweeps the same: their cells' experiments and the reference."""
    return _digest({"cells": sorted({c.name for c in cells}), "reference": spec.reference_method})


def sweep_name(spec: SweepSpec, cells: list[Cell]) -> str:
    return spec.name or f"sweep-{grid_digest(spec, cells)}"


def partition_done(config: ExperimentConfig) -> bool:
    """The partition stage writes clients.json, stats.json, then the heat map: the last one marks it done."""
    return (Path(config.runtime.partitions_dir) / "partition.png").is_file()


def _written_after(path: Path, reference: Path) -> bool:
    return path.is_file() and path.stat().st_mtime_ns >= reference.stat().st_mtime_ns


def _final_checkpoint(config: ExperimentConfig) -> dict | None:
    """The cell's `final.pt` if it verifies and was written by this config, else None."""
    try:
        ckpt = load_checkpoint(run_paths(config).checkpoints / FINAL_NAME)
    except CheckpointError:
        return None
    return ckpt if identity_of(ckpt["config"]) == config.identity() else None


def pending_steps(config: ExperimentConfig) -> list[str]:
    """What a cell still has to run: `train` and/or `evaluate` (nothing once it is finished)."""
    paths = run_paths(config)
    final = paths.checkpoints / FINAL_NAME
    if _final_checkpoint(config) is None or not _written_after(paths.metrics / "train.json", final):
        return ["train", "evaluate"]
    return [] if _written_after(paths.metrics / "eval.json", final) else ["evaluate"]


def adjustment_drops(history: list[dict]) -> tuple[float | None, float | None]:
    """(prune_drop, post_adjust_drop) over the adjustment rounds of a run's history, None where absent.

    prune_drop: the core's own round metric (accuracy just before minus just after the server's
    prune-and-grow), when it logs one; post_adjust_drop: acc(r-1) - acc(r) across each adjustment round r > 1.
    """
    adjusted = [h for h in history if h.get("adjusted")]
    prune = [float(h["prune_drop"]) for h in adjusted if "prune_drop" in h]
    acc = {int(h["round"]): float(h["accuracy"]) for h in history if "accuracy" in h}
    post = [acc[r - 1] - acc[r] for r in (int(h["round"]) for h in adjusted) if r in acc and r - 1 in acc]
    return (statistics.fmean(prune) if prune else None, statistics.fmean(post) if post else None)


RERUN_CELL = "delete the cell's run folder and run the sweep again"


def cell_result(cell: Cell) -> CellResult:
    """A finished cell's numbers, read from its run folder: evaluated accuracy, measured footprint,
    accuracy per round and the adjustment drops (from the final checkpoint's round history)."""
    paths = run_paths(cell.config)
    evaluated, facts = read_eval_metrics(paths), read_run_facts(paths, cell.config)
    memory = paths.metrics / "memory.json"
    history = load_checkpoint(paths.checkpoints / FINAL_NAME)["history"]
    prune_drop, post_adjust_drop = adjustment_drops(history)
    devices_json = paths.metrics / "devices.json"
    devices = {}
    if cell.config.devices.enabled and devices_json.is_file():  # who could train, per device tier
        devices = read_record(devices_json, {"participation": (int, float), "tiers": list}, RERUN_CELL)
    return CellResult(
        method=cell.method, density=cell.density, seed=cell.seed, accuracy=float(evaluated["accuracy"]),
        budget=cell.budget,
        dense=cell.dense, mean_last=mean_of_last(history, cell.config.runtime.eval_mean_last),
        mean_rounds=cell.config.runtime.eval_mean_last,
        footprint_bytes=read_record(memory, {}, RERUN_CELL).get("footprint_bytes") if memory.is_file() else None,
        curve=tuple((int(h["round"]), float(h["accuracy"])) for h in history if "accuracy" in h),
        prune_drop=prune_drop, post_adjust_drop=post_adjust_drop,
        run_dir=str(paths.root), mlflow_run_id=facts["mlflow_run_id"] if facts else "",
        participation=devices.get("participation"),
        tier_accuracy=tuple((t["tier"], t["accuracy_on_its_data"]) for t in devices.get("tiers", [])
                            if t.get("accuracy_on_its_data") is not None),
    )


def parent_params(spec: SweepSpec) -> dict[str, str]:
    """The grid and the shared overrides, as the parent run's MLflow params."""
    params = {"methods": ",".join(spec.methods), "densities": ",".join(f"{d:g}" for d in spec.densities),
              "seeds": ",".join(map(str, spec.seeds)), "reference": spec.reference_method, "params": spec.params}
    if spec.budgets:
        params.update(budgets=",".join(f"{b:g}" for b in spec.budgets), policy=spec.policy)
    params.update({f"set.{k}": json.dumps(v) for k, v in spec.overrides.items()})
    for method, overrides in spec.method_overrides.items():
        params.update({f"set.{method}:{k}": json.dumps(v) for k, v in overrides.items()})
    return params


@contextmanager
def parent_run(tracking: TrackingConfig, name: str, digest: str, params: dict[str, str]) -> Iterator[Tracker]:
    """The sweep's MLflow parent run (reused by a re-run of the same sweep), ended on every way out."""
    tracker = Tracker(tracking)
    if tracker.enabled:
        tracker.check_reachable()
        tags = {"sweep": name, "sweep_digest": digest, "git_commit": git_commit()}
        with store_failures(tracker.uri):
            tracker.run_id = tracker.continue_or_start(name, {"sweep_digest": digest}, tags, params)
        tracker.set_tags({"prefect_flow_run_id": prefect_flow_run_id()})
    with ended(tracker):
        yield tracker


def child_tags(parent: Tracker, name: str) -> dict[str, str]:
    """Tags that make a cell's MLflow run a child of the sweep's parent run."""
    return {"mlflow.parentRunId": parent.run_id, "sweep": name} if parent.run_id else {}


def cell_threads(threads: int, jobs: int) -> int:
    """torch threads of one of `jobs` cells training at once in this process: cells x threads <= cores."""
    return max(1, min(threads, (os.cpu_count() or 1) // jobs))
