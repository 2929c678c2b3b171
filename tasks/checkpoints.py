"""The run's checkpoints in the pipeline: the server it starts from, what each round leaves in the run folder,
the final model. The schedule is :class:`~fedmef_core.rounds.Checkpoints`' and the resume policy
:mod:`fedmef_core.resume`'s; the files here add the run facts and the masks of adjustment rounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmef_core.algorithms import build_algorithm
from fedmef_core.checkpoint import FINAL_NAME, CheckpointError, check_layout, load_checkpoint, remove_checkpoints
from fedmef_core.config import ExperimentConfig, identity_of
from fedmef_core.data import load_dataset, load_partition, partition_origin
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server
from fedmef_core.models import build_model
from fedmef_core.rounds import Checkpoints, RoundOutcome, no_client_trained, untrained
from fedmef_core.runs import RunPaths, write_run_facts
from tasks.masks import save_adjusted_masks


class RoundSaver(Checkpoints):
    """What a finished round leaves in the run folder: the checkpoints on their schedule (see
    :class:`~fedmef_core.rounds.Checkpoints`), `run.json` before each, and the masks of adjustment rounds; a fresh
    run's stale checkpoints go once its first one is safe. The checkpoints hold only what identical runs share
    (their split's digest, not the MLflow run): `facts` (:func:`~fedmef_core.runs.run_facts`) go to `run.json`,
    naming the run that wrote them."""

    def __init__(self, config: ExperimentConfig, paths: RunPaths, facts: dict[str, Any], fresh: bool):
        extra = {"partition": facts["partition"]}
        super().__init__(paths.checkpoints, config.runtime.checkpoint_every, config.federation.rounds,
                         extra=lambda: extra)
        self.paths, self.facts = paths, facts
        self.stale = fresh  # a fresh start replaces whatever an earlier, different run left here

    def save_round(self, server: Server, rnd: int) -> Path:
        if self.stale:
            remove_checkpoints(self.paths.checkpoints)
            self.stale = False
        write_run_facts(self.paths, self.facts)
        return super().save_round(server, rnd)

    def save(self, server: Server, outcome: RoundOutcome) -> Path | None:
        """The round's checkpoint, if due; the masks file of an adjustment round (returned: the flow logs it)."""
        self.round_done(server, outcome)
        return save_adjusted_masks(server, outcome.round, outcome.metrics, self.paths.checkpoints)


def load_final_model(config: ExperimentConfig, paths: RunPaths) -> tuple[torch.nn.Module, dict]:
    """The trained global model from `final.pt`, plus the checkpoint dict; :class:`~fedmef_core.rounds.NoClientTrained`
    if no client ever trained it."""
    ckpt = load_checkpoint(paths.checkpoints / FINAL_NAME)
    if identity_of(ckpt["config"]) != config.identity():
        raise CheckpointError(
            f"{paths.checkpoints / FINAL_NAME} was written by a different configuration (e.g. another model.arch "
            "or pruning.method); evaluate with the config that trained it, or re-run the train stage"
        )
    if untrained(ckpt["history"]):  # a training that failed so: its untrained model is no result
        raise no_client_trained(config, int(ckpt["round"]), "there is nothing to evaluate")
    train, _ = load_dataset(config.data)
    model = build_model(config.model, train.images.shape[1], train.num_classes, train.images.shape[-1])
    check_layout(paths.checkpoints / FINAL_NAME, ckpt, {"model": model.state_dict()})
    try:
        model.load_state_dict(ckpt["model"])
        algorithm = build_algorithm(config)
        algorithm.bind_state(model, algorithm.state_type.from_wire(ckpt["server_state"]))
    except Exception as exc:  # noqa: BLE001 - what a server state that lies makes the algorithm raise
        raise CheckpointError(f"{paths.checkpoints / FINAL_NAME}: passes its checksum but its server state does "
                              f"not fit the model ({type(exc).__name__}: {exc}); re-run the train stage") from None
    return model, ckpt


def start_server(config: ExperimentConfig) -> Server:
    """The server at round 0, on a partition validated against this dataset and config first (whichever
    way the run started: CLI, DVC, the UI or a sweep)."""
    train, test = load_dataset(config.data)
    parts = load_partition(config.runtime.partitions_dir, expected=partition_origin(config, train.labels.numpy()))
    return Server(config, train, test, parts, resolve_device(config.runtime.device))


