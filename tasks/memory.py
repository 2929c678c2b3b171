"""The memory report of a training run: one client step, measured once at the start of training.

Logged as MLflow metrics ``memory/*_mib`` (step 0), a JSON (``metrics/memory.json``, also an MLflow
artifact), a stacked-bar PNG by part (``plots/memory.png``) and a Prefect table artifact
(``memory-report``) when running inside a flow or task run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmef_core.config import ExperimentConfig
from fedmef_core.data import ImageData, iterate_batches, load_dataset
from fedmef_core.initial import initial_model
from fedmef_core.io import write_json
from fedmef_core.memory import MemoryReport, measure_step
from fedmef_core.plots import plot_memory_parts
from fedmef_core.runs import RunPaths
from fedmef_core.sap import apply_sap, resolve_sap
from services.tracking.tracker import Tracker

MIB = 2**20


def client_step_report(config: ExperimentConfig, model: nn.Module, data: ImageData,
                       device: torch.device) -> MemoryReport:
    """Account one local step as a client runs it: SAP applied when enabled, a full batch, and the
    prunable weights stored sparse at ``pruning.density`` for the sparse methods."""
    work = copy.deepcopy(model).to(device)
    sap = resolve_sap(config)
    if sap is not None:
        apply_sap(work, sap)
    fed = config.federation
    n = min(fed.batch_size, len(data.labels))
    x, y = next(iterate_batches(data, list(range(n)), n, device=device))
    density = config.pruning.density if config.pruning.density < 1 else None
    return measure_step(work, x, y, momentum=fed.momentum, density=density)


def initial_step_report(config: ExperimentConfig, device: torch.device | None = None) -> MemoryReport:
    """:func:`client_step_report` of ``config``'s global model before round 1 (what a run reports when it starts)."""
    train, _ = load_dataset(config.data)
    model, _, _ = initial_model(config, train.shape)
    return client_step_report(config, model, train, device or torch.device("cpu"))


def _table(report: MemoryReport) -> list[dict]:
    rows = [{"part": k, "MiB": round(v / MIB, 3), "bytes": v} for k, v in report.parts().items()]
    rows.append({"part": "footprint (weights + activations)", "MiB": round(report.footprint_bytes / MIB, 3),
                 "bytes": report.footprint_bytes})
    rows.append({"part": "total", "MiB": round(report.total_bytes / MIB, 3), "bytes": report.total_bytes})
    if report.peak_bytes is not None:
        rows.append({"part": "device peak", "MiB": round(report.peak_bytes / MIB, 3), "bytes": report.peak_bytes})
    return rows


def _prefect_table(report: MemoryReport, config: ExperimentConfig) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return  # outside a run there is nowhere to attach it
    create_table_artifact(
        table=_table(report),
        key="memory-report",
        description=f"Memory of one client training step ({config.model.arch}, {config.pruning.method}, "
        f"batch {report.batch_size}); activations measured with saved_tensors_hooks.",
    )


def log_memory_report(config: ExperimentConfig, report: MemoryReport, paths: RunPaths,
                      tracker: Tracker | None) -> None:
    """Write ``metrics/memory.json`` and ``plots/memory.png`` in the run folder, log them to MLflow (unless
    `tracker` is None: a resumed run logged them when it started) and Prefect."""
    json_path = paths.metrics / "memory.json"
    png_path = paths.plots / "memory.png"
    write_json(json_path, report.to_dict())
    label = f"{config.pruning.method}\n{config.model.arch}/{config.model.norm}"
    plot_memory_parts({"one client step": {label: report.parts()}}, png_path,
                      title=f"batch {report.batch_size}, {'cuda' if report.peak_bytes is not None else 'cpu'}")
    if tracker is not None:
        tracker.log_metrics(report.metrics(), step=0)
        tracker.log_artifact(json_path)
        tracker.log_artifact(png_path, "plots")
    _prefect_table(report, config)
