import torch

from fedmef_core.checkpoint import load_verified
from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset, partition_indices
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_rounds
from tasks.masks import mask_path, save_adjusted_masks, write_mask_plots
from tests.conftest import tiny_raw


class _Recorder:
    def __init__(self):
        self.artifacts = []

    def log_artifact(self, path, where=None):
        self.artifacts.append((str(path), where))


def test_masks_saved_at_adjustments_and_plots_written(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["data"]["train_limit"] = 600
    raw["federation"].update(rounds=2, clients_per_round=2)
    raw["pruning"] = {"method": "fedtiny", "density": 0.2, "adjust_interval": 2, "adjust_until": 4}
    config = parse_config(raw)
    train, test = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    server = Server(config, train, test, parts, resolve_device("cpu"))
    tracker, saved = _Recorder(), []
    run_rounds(server, on_round=lambda r, m: saved.append(
        save_adjusted_masks(server, r, m, config.runtime.checkpoints_dir, tracker)))
    assert saved[0] is None and saved[1] == mask_path(config.runtime.checkpoints_dir, 2)
    stored = load_verified(saved[1])
    assert stored["round"] == 2
    assert all(torch.equal(stored["masks"][k], m) for k, m in server.state.masks.items())
    paths = write_mask_plots(server, config.runtime.plots_dir, tracker, title="fedtiny")
    assert all(p.stat().st_size > 1000 for p in paths)
    assert [w for _, w in tracker.artifacts] == ["masks", "plots", "plots"]


def test_dense_fedavg_writes_no_masks_but_the_plots_dvc_expects(tmp_path):
    from fedmef_core.algorithms.records import ServerState
    from fedmef_core.config import ModelConfig
    from fedmef_core.models import build_model

    class S:
        state = ServerState()  # dense FedAvg's: no masks
        history: list = [{"round": 1, "accuracy": 0.5, "loss": 1.0, "train_loss": 1.0}]
        model = build_model(ModelConfig(), 1, 10, 28)

    assert save_adjusted_masks(S(), 1, {"adjusted": 1.0}, tmp_path) is None
    paths = write_mask_plots(S(), tmp_path)
    assert [p.name for p in paths] == ["density.png", "accuracy_adjustments.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
