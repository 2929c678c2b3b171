"""The run's checkpoints: where a training resumes from, what each round saves, the final model.

Resume policy: the newest round checkpoint that verifies and was written by the same configuration.
Checkpoints of a different configuration in the same folder are removed only once the new run has saved
its own first checkpoint, so a run that fails to start leaves the previous good ones in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmef_core.algorithms import build_algorithm
from fedmef_core.checkpoint import (
    FINAL_NAME,
    CheckpointError,
    check_layout,
    latest_good_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    round_checkpoint_path,
    save_checkpoint,
)
from fedmef_core.config import ExperimentConfig, identity_of
from fedmef_core.data import load_dataset, load_partition, partition_origin
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server
from fedmef_core.errors import UserError
from fedmef_core.io import InvalidFile
from fedmef_core.models import build_model
from fedmef_core.runs import RunPaths, read_run_facts, read_train_metrics, write_run_facts
from tasks.masks import save_adjusted_masks


def resume_point(config: ExperimentConfig, paths: RunPaths, partition: str, reference: dict) -> dict | None:
    """The newest good checkpoint written by this same configuration on this same partition (its
    :func:`~fedmef_core.data.split_digest`), whose weights fit `reference` (the fresh server's checkpoint),
    or None. One that passes its checksum but holds something else is reported and skipped."""
    if not config.runtime.resume:
        return None
    identity = config.identity()

    def accept(ckpt: dict, path: Path) -> bool:
        if identity_of(ckpt["config"]) != identity or ckpt["extra"].get("partition") != partition:
            return False
        check_layout(path, ckpt, reference)
        return True

    return latest_good_checkpoint(
        paths.checkpoints, accept=accept, on_skip=lambda msg: print(f"checkpoint skipped: {msg}", flush=True),
    )


class RoundSaver:
    """Saves what a finished round leaves behind: a checkpoint every `checkpoint_every` rounds (and the
    last), the masks of adjustment rounds; stale checkpoints go once the first new one is safe. The
    checkpoints hold only what identical runs share (their split's digest, not the MLflow run): `facts`
    (:func:`~fedmef_core.runs.run_facts`) are written to `run.json` before each, naming the run that wrote it."""

    def __init__(self, config: ExperimentConfig, paths: RunPaths, facts: dict[str, Any], fresh: bool):
        self.config, self.paths, self.facts = config, paths, facts
        self.extra = {"partition": facts["partition"]}
        self.stale = fresh  # a fresh start replaces whatever an earlier, different run left here

    def __call__(self, server: Server, rnd: int, metrics: dict[str, float], tracker: Any = None) -> None:
        cfg = self.config
        if rnd % cfg.runtime.checkpoint_every == 0 or rnd == cfg.federation.rounds:
            if tracker is not None:  # the rounds this checkpoint holds will not run again after a resume
                tracker.flush()
            if self.stale:
                remove_checkpoints(self.paths.checkpoints)
                self.stale = False
            write_run_facts(self.paths, self.facts)
            save_checkpoint(round_checkpoint_path(self.paths.checkpoints, rnd), server.checkpoint(self.extra))
        save_adjusted_masks(server, rnd, metrics, self.paths.checkpoints, tracker)

    def final(self, server: Server) -> Path:
        return save_checkpoint(self.paths.checkpoints / FINAL_NAME, server.checkpoint(self.extra))


def finished_summary(config: ExperimentConfig, paths: RunPaths, resumed: dict) -> dict | None:
    """What the training that `resumed` (its last round's checkpoint) came from reported at its end —
    `train.json` and `run.json` — if it finished: its final checkpoint and both files written for this config
    and split; else None (something of its end is missing, and is written again)."""
    partition = resumed["extra"].get("partition")
    if int(resumed["round"]) < config.federation.rounds:
        return None
    try:
        final, train = load_checkpoint(paths.checkpoints / FINAL_NAME), read_train_metrics(paths)
        facts = read_run_facts(paths, config, partition, finished=True)
    except (UserError, OSError):  # missing or damaged: the training's end is written again
        return None
    same = identity_of(final["config"]) == config.identity() and final["extra"].get("partition") == partition
    done = int(final["round"]) == train["rounds"] == config.federation.rounds
    return {**train, **facts} if same and done and facts is not None else None


def training_run_id(config: ExperimentConfig, paths: RunPaths, ckpt: dict) -> str:
    """The MLflow run of the training that wrote checkpoint `ckpt` of `config`, as `run.json` names it; ""
    if it names none (tracking was off, the checkpoints came from `dvc pull`, another experiment wrote it, or it
    is damaged: said once, and the next training writes it again)."""
    try:
        facts = read_run_facts(paths, config, ckpt["extra"].get("partition", ""))
    except InvalidFile as exc:
        print(f"{exc}; the checkpoints' MLflow run is unknown", flush=True)
        return ""
    return facts["mlflow_run_id"] if facts else ""


def load_final_model(config: ExperimentConfig, paths: RunPaths) -> tuple[torch.nn.Module, dict]:
    """The trained global model from `final.pt`, plus the checkpoint dict."""
    ckpt = load_checkpoint(paths.checkpoints / FINAL_NAME)
    if identity_of(ckpt["config"]) != config.identity():
        raise CheckpointError(
            f"{paths.checkpoints / FINAL_NAME} was written by a different configuration (e.g. another model.arch "
            "or pruning.method); evaluate with the config that trained it, or re-run the train stage"
        )
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


def resume(server: Server, config: ExperimentConfig, paths: RunPaths, partition: str) -> dict | None:
    """Restore `server` from this run's newest good checkpoint on the same partition (`partition`: the
    :func:`split_digest` of the server's split); return it (or None)."""
    resumed = resume_point(config, paths, partition, reference=server.checkpoint())
    if resumed is not None:
        server.restore(resumed)
        print(f"resuming from round {server.round} (checkpoint in {paths.checkpoints})", flush=True)
    return resumed
