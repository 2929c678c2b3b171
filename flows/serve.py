"""Serve the flows as deployments the Prefect UI can trigger: `python -m flows.serve` (or `make serve`).

Start a server first (`prefect server start`), point this process at it (`PREFECT_API_URL`), then
open the UI: each deployment shows the ExperimentConfig as a validated form whose defaults come from
`params.yaml`. An invalid value is refused by the server before any run starts.
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve

from fedmef_core.config import ConfigError, ExperimentConfig, load_config
from flows.evaluate import evaluate_flow
from flows.partition import partition_flow
from flows.pipeline import pipeline_flow
from flows.train import train_flow

FLOWS = {"pipeline": pipeline_flow, "partition": partition_flow, "train": train_flow, "evaluate": evaluate_flow}


def deployments(config: ExperimentConfig) -> list:
    """One deployment per flow, named `fedmef`, defaults from `config`, parameters validated by the server."""
    defaults = {"config": config.model_dump(mode="json")}
    return [
        flow.to_deployment(
            name="fedmef",
            parameters=defaults,
            description=flow.description,
            tags=["fedmef", name],
            enforce_parameter_schema=True,
        )
        for name, flow in FLOWS.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="defaults of the UI form (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    serve(*deployments(config))


if __name__ == "__main__":
    main()
