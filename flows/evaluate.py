"""Evaluate flow: test the trained global model — the run folder's final checkpoint, or a model logged in MLflow.

    python -m flows.evaluate [--params FILE] [--set section.key=value ...] [--model URI]

`--model models:/fedmef-cnn/1` (or `models:/fedmef-cnn@champion`, `runs:/<run id>/model`) loads that model from
the MLflow store of `tracking.mlflow_uri` and tests it on the data it was trained on; in the Prefect UI it is the
flow's `model_uri` parameter.
"""

from __future__ import annotations

from prefect import flow

from fedmef_core.config import ExperimentConfig
from flows import cli
from flows.cli import fails_cleanly
from services.tracking.logged_models import URI_FORMS, check_model_uri
from tasks import preflight
from tasks.evaluation import evaluate_model

OPTIONS = {"--model": {"dest": "model_uri", "metavar": "URI", "default": None,
                       "help": f"evaluate this model logged in MLflow instead of the final checkpoint: {URI_FORMS}"}}


@flow(name="evaluate", log_prints=True)
@fails_cleanly
def evaluate_flow(config: ExperimentConfig = ExperimentConfig(), model_uri: str | None = None) -> dict:
    """Test accuracy and loss, per-class accuracy and a confusion matrix of the final model.

    Args:
        config: The experiment: its run folder's final checkpoint is tested, on its data.
        model_uri: Test this model logged in MLflow instead (in the store of tracking.mlflow_uri, on the data it
            was trained on): models:/<name>/<version>, models:/<name>@<alias> or runs:/<run id>/model, e.g.
            models:/fedmef-cnn/1. Empty: the final checkpoint.
    """
    model_uri = check_model_uri(model_uri) if model_uri else None
    result = evaluate_model(config, model_uri)
    tested = f"{model_uri}: " if model_uri else ""
    print(f"{tested}test accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    return result


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`python -m flows.evaluate` or `fedmef evaluate` [--params FILE] [--set section.key=value ...] [--model URI]."""
    return cli.main(evaluate_flow, preflight.for_evaluate, argv, prog, options=OPTIONS)


if __name__ == "__main__":
    main()
