"""What a finished round leaves behind: a checkpoint every `checkpoint_every` rounds, and before it the
metrics the tracker held back (after a resume those rounds do not run again, so they must be in the store)."""

from pathlib import Path

import torch

from fedmef_core.checkpoint import load_checkpoint, round_checkpoint_path, round_checkpoints
from fedmef_core.data import load_dataset
from fedmef_core.engine import Server, run_rounds
from fedmef_core.runs import read_run_facts, run_facts, run_paths
from flows.train import RoundOutputs
from tasks.checkpoints import RoundSaver
from tasks.devices import DeviceReporter
from tasks.outputs import RoundReporter
from tests.conftest import prepare_run, save_partition_of


class RecordingTracker:
    """Records, at each flush, which checkpoints were already on disk."""

    def __init__(self, folder: Path):
        self.folder, self.flushes = folder, []

    def flush(self):
        self.flushes.append(sorted(p.name for p in self.folder.glob("round_*.pt")))

    def log_metrics(self, *args, **kwargs):
        pass

    def log_artifact(self, *args, **kwargs):  # mask files of adjustment rounds
        pass


def test_the_held_metrics_are_flushed_before_each_checkpoint_and_only_then(tmp_path):
    _, config = prepare_run(tmp_path, rounds=4)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"checkpoint_every": 2})})
    train, test = load_dataset(config.data)
    server = Server(config, train, test, save_partition_of(config), torch.device("cpu"))
    paths = run_paths(config)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    (paths.checkpoints / "round_0007.pt").write_bytes(b"an earlier, different run's")
    tracker = RecordingTracker(paths.checkpoints)
    facts = run_facts(config, "the split's digest", "run-1")
    save = RoundSaver(config, paths, facts, fresh=True)
    outputs = RoundOutputs(RoundReporter(config, paths, tracker, first_round=1),
                           DeviceReporter(config, paths, tracker, server), save, tracker)
    run_rounds(server, observers=[outputs])  # the one loop, with the flow's round outputs
    # at rounds 2 and 4, each before its checkpoint; the stale checkpoint went when the first new one was saved
    assert tracker.flushes == [["round_0007.pt"], ["round_0002.pt"]]
    assert [r for r, _ in round_checkpoints(paths.checkpoints)] == [2, 4] and (paths.checkpoints / "final.pt").exists()
    assert read_run_facts(paths, config, "the split's digest") == facts  # run.json names the checkpoints' run
    assert load_checkpoint(round_checkpoint_path(paths.checkpoints, 4))["extra"] == {"partition": "the split's digest"}
