"""The run's Markdown summary, shown on the flow run's page in the Prefect UI."""

from __future__ import annotations

from fedmef_core.config import ExperimentConfig


def mlflow_run_link(config: ExperimentConfig, run_id: str) -> str:
    uri = config.tracking.mlflow_uri
    if not run_id:
        return "tracking off"
    if uri.startswith(("http://", "https://")):
        return f"[{run_id}]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"`{run_id}` — open with `mlflow ui --backend-store-uri {uri}` (then http://127.0.0.1:5000/#/runs/{run_id})"


def summary_markdown(config: ExperimentConfig, train: dict, evaluation: dict | None = None) -> str:
    rows = [
        ("method", f"{config.pruning.method} ({config.model.arch}, {config.data.name}, {config.partition.scheme})"),
        ("rounds", f"{train['rounds']} ({train['seconds_per_round']:.2f} s/round)"),
        ("final test accuracy", f"{train['accuracy']:.4f}"),
        ("final test loss", f"{train['loss']:.4f}"),
    ]
    if evaluation:
        rows.append(("evaluated accuracy", f"{evaluation['accuracy']:.4f}"))
    rows.append(("MLflow run", mlflow_run_link(config, train.get("mlflow_run_id", ""))))
    if train.get("model_uri"):
        rows.append(("MLflow model", f"`{train['model_uri']}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# fedmef run summary\n\n| | |\n|---|---|\n{table}\n"


def publish_summary(config: ExperimentConfig, train: dict, evaluation: dict | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        summary_markdown(config, train, evaluation), key="run-summary", description="fedmef run summary"
    )
