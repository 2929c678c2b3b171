"""Train flow: federated rounds in order, one Prefect task per client update, tracked in MLflow."""

from __future__ import annotations

from prefect import flow

from fedmef_core.config import ExperimentConfig
from flows.cli import main
from tasks import preflight
from tasks.reporting import publish_summary
from tasks.training import run_training


@flow(name="train", log_prints=True)
def train_flow(config: ExperimentConfig = ExperimentConfig()) -> dict:
    """Run federated training and write checkpoints, per-round metrics and the MLflow run."""
    summary = run_training(config, run_name=f"{config.pruning.method}-{config.model.arch}-{config.data.name}")
    print(
        f"trained {summary['rounds']} rounds in {summary['seconds']:.0f}s: "
        f"accuracy {summary['accuracy']:.4f}, MLflow run {summary['mlflow_run_id'] or '(tracking off)'}"
    )
    publish_summary(config, summary)
    return summary


if __name__ == "__main__":
    main(train_flow, preflight.for_train)
