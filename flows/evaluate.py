"""Evaluate flow: test the trained global model."""

from __future__ import annotations

from prefect import flow

from fedmef_core.config import ExperimentConfig
from flows import cli
from flows.cli import fails_cleanly
from tasks import preflight
from tasks.evaluation import evaluate_model


@flow(name="evaluate", log_prints=True)
@fails_cleanly
def evaluate_flow(config: ExperimentConfig = ExperimentConfig()) -> dict:
    """Test accuracy and loss, per-class accuracy and a confusion matrix of the final model."""
    result = evaluate_model(config)
    print(f"test accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    return result


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`python -m flows.evaluate` or `fedmef evaluate` [--params FILE] [--set section.key=value ...]."""
    return cli.main(evaluate_flow, preflight.for_evaluate, argv, prog)


if __name__ == "__main__":
    main()
