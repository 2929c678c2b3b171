"""What a finished round leaves behind: a checkpoint every `checkpoint_every` rounds, and before it the
metrics the tracker held back (after a resume those rounds do not run again, so they must be in the store)."""

from pathlib import Path

import torch

from fedmef_core.checkpoint import load_checkpoint, round_checkpoint_path
from fedmef_core.data import load_dataset
from fedmef_core.engine import Server
from fedmef_core.runs import read_run_facts, run_facts, run_paths
from tasks.checkpoints import RoundSaver
from tests.conftest import prepare_run, save_partition_of


class RecordingTracker:
    """Records, at each flush, which checkpoints were already on disk."""

    def __init__(self, folder: Path):
        self.folder, self.flushes = folder, []

    def flush(self):
        self.flushes.append(sorted(p.name for p in self.folder.glob("round_*.pt")))

    def log_artifact(self, *args, **kwargs):  # mask plots of adjustment rounds
        pass


def test_the_held_metrics_are_flushed_before_each_checkpoint_and_only_then(tmp_path):
    _, config = prepare_run(tmp_path, rounds=4)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"checkpoint_every": 2})})
    train, test = load_dataset(config.data)
    server = Server(config, train, test, save_partition_of(config), torch.device("cpu"))
    paths = run_paths(config)
    tracker = RecordingTracker(paths.checkpoints)
    facts = run_facts(config, "the split's digest", "run-1")
    save = RoundSaver(config, paths, facts, fresh=True)
    for rnd in range(1, 5):
        save(server, rnd, {"round": rnd}, tracker)
    assert tracker.flushes == [[], ["round_0002.pt"]]  # at rounds 2 and 4, each before its checkpoint
    assert round_checkpoint_path(paths.checkpoints, 4).exists()
    assert read_run_facts(paths, config, "the split's digest") == facts  # run.json names the checkpoints' run
    assert load_checkpoint(round_checkpoint_path(paths.checkpoints, 4))["extra"] == {"partition": "the split's digest"}
