"""The trained model in MLflow: every training's final model as the run's logged model, registered as a new
version of ``fedmef-<arch>``; a sweep's aliases on the best versions; a model loaded back by its URI.

What a logged model holds: the final global weights with the masks applied, pickled as the model class itself
(`serialization_format="pickle"`: an NSConv layer keeps its mask attached, which zeroed weights alone do not
give it, and evaluation gets the same module the training evaluated — MLflow's default `pt2` would trace a
fixed graph instead), so loading one needs this project's package (``fedmef_core``) importable; beside them
``masks.pt`` (the final masks of a sparse method: ``{layer weight name: bool tensor}``) and, in the model's
metadata under ``fedmef``, the resolved config and the training's result. Its signature and input example
are two test images as the model takes them (float32, normalised, N x C x H x W) and their logits.

MLflow's `log_model`, and its resolution of a ``models:/`` URI, read the store from its process-wide tracking URI
(whatever registry URI is passed): it is set for the call alone, one call at a time (cells of a sweep log from
threads of one process).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as dist_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmef_core.config import RUN_ONLY_SECTIONS, ExperimentConfig, TrackingConfig, parse_config
from fedmef_core.data import iterate_batches
from fedmef_core.errors import UserError
from fedmef_core.models import prunable_weights
from fedmef_core.models.nsconv import attach_masks
from fedmef_core.sparse import apply_masks
from services.comparison import CellResult, best_aliases
from services.tracking.tracker import Tracker, filter_value, store_failures, store_uri

MODEL_NAME = "model"  # the run's logged model: runs:/<run id>/model
EXAMPLE_SIZE = 2  # test images in the input example
METADATA_KEY = "fedmef"
URI_FORMS = "models:/<name>/<version>, models:/<name>@<alias> or runs:/<run id>/model, e.g. models:/fedmef-cnn/1"
_URI = re.compile(r"(models:/[^\s/@]+(/[^\s/]+|@[\w-]+)?|runs:/[0-9a-f]{32}/\S+)")
_ONE_CALL_AT_A_TIME = threading.Lock()


class BadModelUri(UserError):
    """A model URI MLflow cannot load a model from."""


class ModelNotFound(UserError):
    """A well-formed model URI the tracking store does not hold (or not a model a training logged)."""


def registered_name(config: ExperimentConfig) -> str:
    """``fedmef-<arch>``, e.g. ``fedmef-cnn``: one registered model per network architecture.

    The versions of one registered model should be able to replace one another wherever it is used: the
    architecture decides the model class and its layers, so every version of ``fedmef-cnn`` loads and runs the
    same way, while the method, density, seed and dataset — how one version was trained — are its tags. So the
    methods a sweep compares are versions of one model, and its aliases (``best-<method>``, ``champion``) can
    point at any of them; a name per method would leave no model for the overall champion, and a single name
    for every architecture would mix networks that cannot stand in for each other."""
    return f"fedmef-{config.model.arch}"


def model_tags(config: ExperimentConfig) -> dict[str, str]:
    """Tags of the logged model and of its registered version."""
    return {"method": config.pruning.method, "density": f"{config.pruning.density:g}",
            "seed": str(config.federation.seed), "arch": config.model.arch, "dataset": config.data.name}


@dataclass(frozen=True)
class TrainedModel:
    """What a training logs: a CPU copy of the final global model (masks applied and attached), its masks
    (None for a dense method) and an input example."""

    model: nn.Module
    masks: dict[str, torch.Tensor] | None
    example: np.ndarray


def trained_model(server: Any) -> TrainedModel:
    """The server's final model as it is logged (a copy: the server's own model is left as it is)."""
    model = copy.deepcopy(server.model).cpu().eval()
    masks = server.state.masks  # only the sparse methods keep masks
    if masks is not None:
        masks = {name: mask.detach().to("cpu", torch.bool) for name, mask in masks.items()}
        with torch.no_grad():
            apply_masks(prunable_weights(model), masks)
        attach_masks(model, masks)
    images, _ = next(iterate_batches(server.test, torch.arange(EXAMPLE_SIZE), EXAMPLE_SIZE))
    return TrainedModel(model, masks, images.numpy())


def requirements() -> list[str]:
    """What loading the model needs: this torch and this project (given, not inferred: MLflow's inference
    loads the model in a subprocess, seconds per training)."""
    needs = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        needs.append(f"fedmef=={dist_metadata.version('fedmef')}")
    except dist_metadata.PackageNotFoundError:  # run from a checkout that is not installed
        pass
    return needs


@contextmanager
def _mlflow_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block (and restored), one block at a time; no
    pickle warning (pickle is chosen on purpose, see the module's doc) and no progress bar per model."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    with _ONE_CALL_AT_A_TIME, _use_tracking_uri(uri):
        logger.setLevel(logging.ERROR)
        os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")
        try:
            yield
        finally:
            logger.setLevel(level)
            if bar is None:
                os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)


def log_trained_model(trained: TrainedModel, config: ExperimentConfig, result: dict[str, Any], uri: str,
                      run_id: str) -> str:
    """Log `trained` as run `run_id`'s model `model` (linked to its metrics of the last round) and register it
    as a new version of :func:`registered_name`, tagged :func:`model_tags`; return ``models:/<name>/<version>``.
    `result`: the training's summary numbers, kept in the metadata beside the config."""
    import mlflow.pytorch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    with torch.no_grad():
        logits = trained.model(torch.from_numpy(trained.example)).numpy()
    meta = {METADATA_KEY: {"config": config.model_dump(mode="json"), **result}}
    name = registered_name(config)
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if trained.masks is not None:
            torch.save(trained.masks, Path(tmp) / "masks.pt")
            extra.append(str(Path(tmp) / "masks.pt"))
        client = MlflowClient(tracking_uri=uri)
        # created here, in the run's experiment (log_model alone would put it in MLflow's active experiment)
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=MODEL_NAME,
                                            source_run_id=run_id, tags=model_tags(config),
                                            params={k: str(v) for k, v in config.flat().items()})
        with _mlflow_store(uri):
            info = mlflow.pytorch.log_model(
                trained.model, name=MODEL_NAME, model_id=logged.model_id, run_id=run_id,
                step=config.federation.rounds,
                signature=infer_signature(trained.example, logits), input_example=trained.example,
                registered_model_name=name, tags=model_tags(config), metadata=meta, extra_files=extra,
                pip_requirements=requirements(), serialization_format="pickle",
            )
    return f"models:/{name}/{info.registered_model_version}"


def log_final_model(config: ExperimentConfig, server: Any, tracker: Tracker) -> str:
    """The training's final model to its MLflow run and the registry (see :func:`log_trained_model`): its
    ``models:/`` URI, or "" with tracking off (or the store away: then it is sent when the store is back)."""
    if not tracker.enabled or not tracker.run_id:
        return ""
    final = server.history[-1]
    result = {"final_accuracy": final["accuracy"], "final_loss": final["loss"], "rounds": config.federation.rounds}
    tracker.log_model(functools.partial(log_trained_model, trained_model(server), config, result),
                      what=f"as a version of {registered_name(config)}")
    return tracker.model_logged or ""


# --- loading a model back ----------------------------------------------------------------------------------


def check_model_uri(uri: str) -> str:
    """`uri` if MLflow can load a model from it (the forms of :data:`URI_FORMS`), else :class:`BadModelUri`."""
    if not _URI.fullmatch(uri.strip()):
        raise BadModelUri(f"model URI {uri!r} is not one a model can be loaded from; use {URI_FORMS}")
    return uri.strip()


@dataclass(frozen=True)
class ModelSource:
    """A logged model found in the store: its local folder, the run that logged it, its metadata."""

    uri: str
    path: str
    run_id: str
    meta: dict[str, Any]


NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow's codes for a URI it does not hold


def not_found(uri: str, store: str, why: str) -> str:
    return (f"model {uri} is not in the MLflow store {store} ({why.strip().splitlines()[0]}); see the registered "
            "models and their versions in the MLflow UI (Models), or fix tracking.mlflow_uri")


def find_model(tracking: TrackingConfig, uri: str) -> ModelSource:
    """The model at `uri` in the store of `tracking` (a local store's files are read where they are, a server's
    are downloaded); a URI it does not hold is one :class:`ModelNotFound` line."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri, store = check_model_uri(uri), store_uri(tracking.mlflow_uri)
    with store_failures(store), _mlflow_store(store):
        try:
            path = download_artifacts(artifact_uri=uri)
            model = Model.load(path)
        except MlflowException as exc:
            if exc.error_code not in NOT_FOUND:
                raise
            raise ModelNotFound(not_found(uri, store, exc.message)) from None
        except OSError as exc:  # a runs:/ URI naming no folder of the run
            raise ModelNotFound(not_found(uri, store, str(exc))) from None
    meta = (model.metadata or {}).get(METADATA_KEY)
    if meta is None or "pytorch" not in model.flavors:
        raise ModelNotFound(f"model {uri} was not logged by a fedmef training (no '{METADATA_KEY}' metadata)")
    return ModelSource(uri, path, model.run_id or "", meta)


def trained_config(config: ExperimentConfig, source: ModelSource) -> ExperimentConfig:
    """The config a logged model was trained with — its data, model and method — run where and how `config`
    says (its tracking, runtime and ray sections): with ``runtime.run_dir: null``, the model's own run folder."""
    here = config.model_dump(mode="json")
    return parse_config({**source.meta["config"], **{s: here[s] for s in RUN_ONLY_SECTIONS}},
                        source=f"the config logged with {source.uri}")


def load_model(source: ModelSource) -> nn.Module:
    import mlflow.pytorch

    return mlflow.pytorch.load_model(source.path, map_location="cpu")


# --- a sweep's aliases ---------------------------------------------------------------------------------------


def point_aliases(tracking: TrackingConfig, results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Per registered model, :func:`~services.comparison.best_aliases` of the cells whose runs logged a version of
    it (``best-<method>``, ``champion``), each set on that version; returns what was set."""
    from mlflow.tracking import MlflowClient

    store = store_uri(tracking.mlflow_uri)
    with store_failures(store):
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        versions: dict[str, tuple[str, str]] = {}  # run id -> (registered model, newest version it logged)
        for run_id in dict.fromkeys(r.mlflow_run_id for r in results if r.mlflow_run_id):
            found = client.search_model_versions(f"run_id = {filter_value(run_id)}")
            if found:
                newest = max(found, key=lambda v: int(v.version))
                versions[run_id] = (newest.name, newest.version)
        by_model: dict[str, list[CellResult]] = {}
        for r in results:
            if r.mlflow_run_id in versions:
                by_model.setdefault(versions[r.mlflow_run_id][0], []).append(r)
        pointed = []
        for name, cells in by_model.items():
            for alias, cell in best_aliases(cells).items():
                version = versions[cell.mlflow_run_id][1]
                client.set_registered_model_alias(name, alias, version)
                pointed.append({"alias": alias, "model": name, "version": version, "method": cell.method,
                                "density": cell.density, "seed": cell.seed, "accuracy": cell.accuracy})
    return pointed
