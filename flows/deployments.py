"""The deployments, one per flow: what `flows.serve` serves on this machine and `flows.deploy` puts in a work pool.

Served ones are named `fedmef` (`train/fedmef`, `sweep/fedmef`, ...), a work pool's after the pool
(`train/fedmef-gpu`), so both can live on one server. Each shows the ExperimentConfig as a validated form whose
defaults come from `params.yaml` (the sweep's shows its grid), and is tagged `fedmef` and its flow's name.
"""

from __future__ import annotations

from typing import Any

from fedmef_core.config import ExperimentConfig
from flows.evaluate import evaluate_flow
from flows.partition import partition_flow
from flows.pipeline import pipeline_flow
from flows.sweep import sweep_flow
from flows.train import train_flow
from services.sweep import SweepSpec

FLOWS = {"pipeline": pipeline_flow, "partition": partition_flow, "train": train_flow, "evaluate": evaluate_flow,
         "sweep": sweep_flow}
NAME = "fedmef"


def form_defaults(name: str, config: ExperimentConfig) -> dict:
    """A flow's form: the experiment config; the sweep's is its grid (its cells start from `params.yaml`)."""
    if name == "sweep":
        return {"spec": SweepSpec().model_dump(mode="json")}
    return {"config": config.as_params()}  # seeds that follow `seed` stay null: changing it moves them


def deployments(config: ExperimentConfig, name: str = NAME, **options: Any) -> list:
    """One deployment per flow, named `name`, defaults from `config`, parameters validated by the server.
    `options` go to every `to_deployment` call (a work pool's: how a worker finds the flow, where it runs)."""
    return [
        flow.to_deployment(
            name=name,
            parameters=form_defaults(flow_name, config),
            description=flow.description,
            tags=[NAME, flow_name],
            enforce_parameter_schema=True,
            **options,
        )
        for flow_name, flow in FLOWS.items()
    ]
