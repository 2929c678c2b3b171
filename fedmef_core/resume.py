"""The resume policy, in one place: where a training of a run folder starts, and which MLflow run it continues.

A training continues from the newest round checkpoint in its folder that

1. verifies (its ``.sha256`` matches; a damaged or truncated one is reported and skipped),
2. was written by the same experiment — ``config.identity()``, what decides the results — on the same split:
   the partition's :func:`~fedmef_core.data.split_digest` (and, with device budgets, the assignment's digest),
   which every checkpoint records in ``extra["partition"]``,
3. holds weights of the model's names, shapes and dtypes, a mask for each prunable layer and a server state the
   method keeps (one that passes its checksum but lies is skipped),

unless ``runtime.resume`` is false. If that checkpoint is the last round's and the training's end was written
(``final.pt``, ``train.json`` and ``run.json`` of this experiment and split), the training is finished: nothing
runs, nothing is rewritten. If it ended (``final.pt``) but its results (``train.json``, ``rounds.csv``) are
gone, it trains again from round 1: that is what ``dvc repro`` leaves when a change re-runs the stage (it
removes the outputs, the checkpoints persist), and the change may be to the code, which the identity does not
cover. So does one in which no client trained in any round (every sampled device excluded or over its budget): it
has no model and never finished, whatever its folder holds (changed code may fit the devices). A resumed
training's MLflow run is the one ``run.json`` — the run facts written before every checkpoint — names for this
experiment and split; none named (tracking was off, outputs from ``dvc pull``) means a new run. Without a
checkpoint to resume the training starts at round 1, and whatever checkpoints the folder holds (another
configuration's) are stale: they are removed once the new run has saved its first one, so a run that fails to
start leaves the previous good ones in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmef_core.checkpoint import FINAL_NAME, CheckpointError, check_layout, latest_good_checkpoint, load_checkpoint
from fedmef_core.config import ExperimentConfig, identity_of
from fedmef_core.data import split_digest
from fedmef_core.engine import Server
from fedmef_core.errors import UserError
from fedmef_core.io import InvalidFile
from fedmef_core.registry import METHODS
from fedmef_core.rounds import untrained
from fedmef_core.runs import RunPaths, read_run_facts, read_train_metrics


@dataclass(frozen=True)
class Resume:
    """Where a training starts (see the module's policy). ``partition``: the split a checkpoint must have been
    written on; ``checkpoint``: the one the server was restored from (None: a fresh start, whose stale
    checkpoints go once it saved its first); ``mlflow_run_id``: the run to continue ("": a new one);
    ``finished``: the finished training's ``train.json`` + ``run.json`` (nothing is left to train)."""

    partition: str
    checkpoint: dict | None = None
    mlflow_run_id: str = ""
    finished: dict | None = None

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None


def split_of(server: Server) -> str:
    """What a checkpoint must have been written on to be resumed by `server`: its split's digest, and its devices'
    budgets with it."""
    split = split_digest(server.parts)
    if server.fleet is not None:
        split += f"+devices-{server.fleet.assignment.digest()}"
    return split


def resume(server: Server, paths: RunPaths) -> Resume:
    """Apply the policy to `server` (at round 0, on the run's partition): restore it from the checkpoint to
    resume, if any, and say where the training stands."""
    config, partition = server.config, split_of(server)
    ckpt = resume_point(config, paths, partition, reference=server.checkpoint())
    if ckpt is None:
        return Resume(partition)
    if int(ckpt["round"]) >= config.federation.rounds and (why := why_again(ckpt, paths)):
        print(f"the training in {paths.checkpoints} {why}: training again from round 1", flush=True)
        return Resume(partition)
    server.restore(ckpt)
    print(f"resuming from round {server.round} (checkpoint in {paths.checkpoints})", flush=True)
    if (done := finished_summary(config, paths, partition, int(ckpt["round"]))) is not None:
        return Resume(partition, ckpt, done["mlflow_run_id"], finished=done)
    return Resume(partition, ckpt, training_run_id(config, paths, partition))


def resume_point(config: ExperimentConfig, paths: RunPaths, partition: str, reference: dict) -> dict | None:
    """The newest good checkpoint written by this same configuration on this same `partition`, whose weights fit
    `reference` (the fresh server's checkpoint), or None. One that passes its checksum but holds something else
    is reported and skipped."""
    if not config.runtime.resume:
        return None
    identity, state_type = config.identity(), METHODS[config.pruning.method].load().state_type

    def accept(ckpt: dict, path: Path) -> bool:
        if identity_of(ckpt["config"]) != identity or ckpt["extra"].get("partition") != partition:
            return False
        check_layout(path, ckpt, reference)
        try:
            state_type.from_wire(ckpt["server_state"])
        except (TypeError, ValueError) as exc:  # a field the method does not keep, a record it cannot read
            raise CheckpointError(f"{path}: passes its checksum but its server state is not one "
                                  f"{config.pruning.method} keeps ({exc}); not resumed") from None
        return True

    return latest_good_checkpoint(
        paths.checkpoints, accept=accept, on_skip=lambda msg: print(f"checkpoint skipped: {msg}", flush=True),
    )


def why_again(last: dict, paths: RunPaths) -> str:
    """Why a training whose `last` round's checkpoint is there trains again from round 1, or "" (it does not)."""
    if untrained(last["history"]):
        return "trained no client in any of its rounds (its model is the initial one)"
    if gone := outputs_gone(paths):
        return (f"reached its last round, but its {' and '.join(gone)} are gone (`dvc repro` removes a stage's "
                "outputs when a change, perhaps to the code, re-runs it)")
    return ""


def outputs_gone(paths: RunPaths) -> list[str]:
    """What is missing of a training that ended (its final checkpoint is there) from the outputs only the
    training writes: a training killed before its end has no ``final.pt`` and resumes as usual."""
    if not (paths.checkpoints / FINAL_NAME).is_file():
        return []
    return [name for name in ("train.json", "rounds.csv") if not (paths.metrics / name).is_file()]


def finished_summary(config: ExperimentConfig, paths: RunPaths, partition: str, rnd: int) -> dict | None:
    """What the training whose last checkpoint is of round `rnd` reported at its end — `train.json` and
    `run.json` — if it finished: its final checkpoint and both files written for this config and `partition`;
    else None (something of its end is missing, and is written again)."""
    if rnd < config.federation.rounds:
        return None
    try:
        final, train = load_checkpoint(paths.checkpoints / FINAL_NAME), read_train_metrics(paths)
        facts = read_run_facts(paths, config, partition, finished=True)
    except (UserError, OSError):  # missing or damaged: the training's end is written again
        return None
    same = identity_of(final["config"]) == config.identity() and final["extra"].get("partition") == partition
    done = int(final["round"]) == train["rounds"] == config.federation.rounds
    return {**train, **facts} if same and done and facts is not None else None


def training_run_id(config: ExperimentConfig, paths: RunPaths, partition: str) -> str:
    """The MLflow run of the training of `config` on `partition` that wrote the folder's checkpoints, as
    `run.json` names it; "" if it names none (tracking was off, the checkpoints came from `dvc pull`, another
    experiment wrote it, or it is damaged: said once, and the next training writes it again)."""
    try:
        facts = read_run_facts(paths, config, partition)
    except InvalidFile as exc:
        print(f"{exc}; the checkpoints' MLflow run is unknown", flush=True)
        return ""
    return facts["mlflow_run_id"] if facts else ""
