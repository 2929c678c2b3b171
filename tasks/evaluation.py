"""The evaluate stage: test accuracy and loss, per-class accuracy, a confusion matrix."""

from __future__ import annotations

from prefect import task

from fedmef_core.config import ExperimentConfig
from fedmef_core.data import load_dataset
from fedmef_core.device import resolve_device
from fedmef_core.evaluation import evaluate
from fedmef_core.io import write_json
from fedmef_core.plots import plot_confusion
from fedmef_core.resume import training_run_id
from fedmef_core.runs import run_paths
from services.tracking.logged_models import find_model, load_model, trained_config
from services.tracking.tracker import Tracker
from tasks.checkpoints import load_final_model


@task(name="evaluate-model")
def evaluate_model(config: ExperimentConfig, model_uri: str | None = None) -> dict:
    """The run folder's final checkpoint or, with `model_uri` (``models:/…``, ``runs:/…``), that model logged in
    MLflow, tested on the data it was trained on (:func:`~services.tracking.logged_models.trained_config`); the
    results go to that run folder and to the MLflow run that trained it."""
    if model_uri:
        source = find_model(config.tracking, model_uri)
        config = trained_config(config, source)
        model, run_id, rnd = load_model(source), source.run_id, int(source.meta["rounds"])
    else:
        model, ckpt = load_final_model(config, run_paths(config))
        split = ckpt["extra"].get("partition", "")  # the split it was trained on
        run_id = training_run_id(config, run_paths(config), split)
        rnd = int(ckpt["round"])
    paths = run_paths(config)
    _, test = load_dataset(config.data)
    result = evaluate(model, test, resolve_device(config.runtime.device))
    per_class = dict(zip(test.class_names, result.per_class_accuracy))
    report = {
        "accuracy": result.accuracy,
        "loss": result.loss,
        "per_class_accuracy": per_class,
        "round": rnd,
        "test_samples": len(test.labels),
        **({"model_uri": model_uri} if model_uri else {}),
    }
    metrics_path = paths.metrics / "eval.json"
    plot_path = paths.plots / "confusion.png"
    write_json(metrics_path, report)
    plot_confusion(result.confusion, test.class_names, plot_path, title=f"accuracy {result.accuracy:.4f}")
    tracker = Tracker(config.tracking, run_id=run_id or None)
    metrics = {"test_accuracy": result.accuracy, "test_loss": result.loss}
    metrics.update({f"test_accuracy_class_{i}": a for i, a in enumerate(result.per_class_accuracy)})
    tracker.log_metrics(metrics, step=rnd)
    tracker.log_artifact(metrics_path, "eval")
    tracker.log_artifact(plot_path, "plots")
    tracker.end()  # the training's finished run, ended again: flushes (or reports) what a store outage held back
    return {"accuracy": result.accuracy, "loss": result.loss, "mlflow_run_id": run_id}
