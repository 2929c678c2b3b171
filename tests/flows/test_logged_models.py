"""Every training's model in MLflow: a logged model registered as `fedmef-<arch>`, loaded back by its URI in a
fresh process with the accuracy the run reported; the run's dataset input and description, the experiment's
kind. A real train flow (Prefect's test harness) on a real sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from fedmef_core.checkpoint import load_checkpoint
from fedmef_core.config import parse_config
from fedmef_core.data import partition_digest
from fedmef_core.models import prunable_weights
from tests.conftest import save_partition_of, tiny_raw

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory):
    """A tiny FedMef training (NSConv, SAP, one mask adjustment) tracked in a sqlite store: (params, config,
    the train flow's summary)."""
    from flows.train import train_flow

    tmp = tmp_path_factory.mktemp("logged")
    raw = tiny_raw(tmp)
    raw["federation"]["rounds"] = 2
    raw["pruning"] = {"method": "fedmef", "density": 0.2, "adjust_interval": 1, "adjust_until": 1}
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "models"}
    config = parse_config(raw)
    (tmp / "params.yaml").write_text(config.to_yaml())
    save_partition_of(config)
    return tmp / "params.yaml", config, train_flow(config)


FRESH_PROCESS = """
import json, runpy, sys
import mlflow.pytorch, torch
from fedmef_core.config import load_config
from fedmef_core.data import load_dataset
from fedmef_core.evaluation import evaluate
model_uri, params = sys.argv[1:]
model = mlflow.pytorch.load_model(model_uri)
_, test = load_dataset(load_config(params).data)
print(json.dumps({"class": type(model).__name__, "accuracy": evaluate(model, test, torch.device("cpu")).accuracy}))
sys.argv = ["flows.evaluate", "--params", params, "--model", model_uri]  # then the evaluate CLI, as typed
runpy.run_module("flows.evaluate", run_name="__main__")
"""


def test_the_registered_model_gives_the_runs_accuracy_in_a_fresh_process_and_through_evaluate(trained):
    """One fresh process (its startup is what costs here): `mlflow.pytorch.load_model("models:/fedmef-cnn/1")`
    and `python -m flows.evaluate --model models:/fedmef-cnn/1`."""
    from prefect.settings import PREFECT_API_URL  # the harness's server: no temporary one to start

    params, config, summary = trained
    assert summary["model_uri"] == "models:/fedmef-cnn/1"
    env = {"MLFLOW_TRACKING_URI": config.tracking.mlflow_uri, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, summary["model_uri"], str(params)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert loaded == {"class": "SmallCNN", "accuracy": summary["accuracy"]}
    evaluated = json.loads((Path(config.runtime.metrics_dir) / "eval.json").read_text())
    assert evaluated["accuracy"] == summary["accuracy"] and evaluated["model_uri"] == summary["model_uri"]
    assert f"{summary['model_uri']}: test accuracy {summary['accuracy']:.4f}" in proc.stdout + proc.stderr


def test_the_logged_model_holds_masked_weights_masks_config_signature_and_example(trained):
    from services.tracking.logged_models import find_model, load_model

    _, config, summary = trained
    client = MlflowClient(config.tracking.mlflow_uri)
    version = client.get_model_version("fedmef-cnn", "1")
    assert version.run_id == summary["mlflow_run_id"]
    assert {k: version.tags[k] for k in ("method", "density", "seed")} == {"method": "fedmef", "density": "0.2",
                                                                          "seed": "3"}
    source = find_model(config.tracking, f"runs:/{summary['mlflow_run_id']}/model")  # the run's URI: the same model
    mlmodel = Model.load(source.path)
    assert version.source == f"models:/{mlmodel.model_id}"
    logged = client.get_logged_model(mlmodel.model_id)
    assert logged.name == "model" and logged.source_run_id == summary["mlflow_run_id"]
    assert logged.experiment_id == client.get_run(summary["mlflow_run_id"]).info.experiment_id  # the model view's
    assert logged.tags["method"] == "fedmef" and logged.params["pruning.density"] == "0.2"
    assert logged.metrics and {m.key for m in logged.metrics} >= {"accuracy", "loss"}  # the last round's
    assert mlmodel.metadata["fedmef"]["config"] == config.model_dump(mode="json")
    assert mlmodel.metadata["fedmef"]["final_accuracy"] == summary["accuracy"]
    assert mlmodel.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    assert mlmodel.saved_input_example_info is not None

    final = load_checkpoint(Path(config.runtime.checkpoints_dir) / "final.pt")
    masks = torch.load(Path(source.path) / "extra_files" / "masks.pt")
    assert masks.keys() == final["server_state"]["masks"].keys()
    assert all(torch.equal(masks[k], final["server_state"]["masks"][k].bool()) for k in masks)
    model = load_model(source)
    for name, weight in prunable_weights(model).items():
        assert torch.count_nonzero(weight[~masks[name]]) == 0, name  # the masks are applied
        assert torch.equal(weight, final["model"][name])


def test_the_run_has_its_partition_as_dataset_a_description_and_the_experiment_its_kind(trained):
    _, config, summary = trained
    client = MlflowClient(config.tracking.mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    (dataset_input,) = run.inputs.dataset_inputs
    digest = partition_digest(config.runtime.partitions_dir)
    assert dataset_input.dataset.digest == digest[:36]
    assert json.loads(dataset_input.dataset.profile)["partition_sha256"] == digest
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    note = run.data.tags["mlflow.note.content"]
    accuracy = f"final test accuracy **{summary['accuracy']:.4f}**"
    for part in ("**fedmef**", "cnn (nsconv)", "density 0.2", "seed 3", accuracy):
        assert part in note
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize(("uri", "message"), [
    ("fedmef-cnn", "model URI 'fedmef-cnn' is not one a model can be loaded from; use models:/<name>/<version>"),
    ("models:/fedmef-cnn/9", "model models:/fedmef-cnn/9 is not in the MLflow store"),
    ("models:/fedmef-cnn@nobody", "model models:/fedmef-cnn@nobody is not in the MLflow store"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "is not in the MLflow store"),
])
def test_a_bad_or_unknown_model_uri_is_one_line_and_exit_2(trained, uri, message, capsys):
    import flows.cli
    from flows.evaluate import OPTIONS, evaluate_flow
    from tasks import preflight

    params, _, _ = trained
    with pytest.raises(SystemExit) as ended:
        flows.cli.main(evaluate_flow, preflight.for_evaluate, argv=["--params", str(params), "--model", uri],
                       options=OPTIONS)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_a_bad_model_uri_from_the_ui_form_fails_the_flow_run_with_one_line(trained):
    from flows.evaluate import evaluate_flow
    from flows.serve import deployments

    _, config, _ = trained
    deployment = next(d for d in deployments(config) if d.flow_name == "evaluate")
    field = deployment._parameter_openapi_schema.model_dump()["properties"]["model_uri"]
    assert field["default"] is None and "models:/fedmef-cnn/1" in field["description"]  # the form's text field
    state = evaluate_flow(config, model_uri="s3://bucket/model", return_state=True)
    assert state.is_failed() and "model URI 's3://bucket/model' is not one a model can be loaded from" in state.message
