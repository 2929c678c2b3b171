"""Pipeline flow: partition -> train -> evaluate, as one flow run with three subflows."""

from __future__ import annotations

from prefect import flow

from fedmef_core.config import ExperimentConfig
from flows import cli
from flows.cli import fails_cleanly
from flows.evaluate import evaluate_flow
from flows.partition import partition_flow
from flows.train import train_flow
from tasks import preflight
from tasks.reporting import publish_summary


@flow(name="pipeline", log_prints=True)
@fails_cleanly
def pipeline_flow(config: ExperimentConfig = ExperimentConfig()) -> dict:
    """The whole experiment: partition the data, train federated, evaluate the final model."""
    partition = partition_flow(config)
    train = train_flow(config)
    evaluation = evaluate_flow(config)
    publish_summary(config, train, evaluation)
    return {"partition": partition, "train": train, "evaluate": evaluation}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`python -m flows.pipeline` or `fedmef pipeline` [--params FILE] [--set section.key=value ...]."""
    return cli.main(pipeline_flow, preflight.for_pipeline, argv, prog)


if __name__ == "__main__":
    main()
