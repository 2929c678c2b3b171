import torch

from fedmef_core.checkpoint import load_checkpoint, round_checkpoint_path, round_checkpoints
from fedmef_core.data import load_dataset
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_rounds
from tests.conftest import server_of


def _key_metrics(history):
    return [(h["round"], h["accuracy"], h["loss"], h["train_loss"]) for h in history]


def test_training_improves_and_is_deterministic(tiny_config):
    first = run_rounds(server_of(tiny_config))
    second = run_rounds(server_of(tiny_config))
    assert _key_metrics(first) == _key_metrics(second)  # bit for bit on CPU
    assert first[-1]["accuracy"] > 0.3  # 10 classes: far above chance after 3 short rounds
    assert first[-1]["train_loss"] < first[0]["train_loss"]


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tiny_config, tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    full = run_rounds(server_of(tiny_config), checkpoint_dir=ckpt_dir)
    assert [r for r, _ in round_checkpoints(ckpt_dir)] == [1, 2, 3]
    resumed = server_of(tiny_config)
    resumed.restore(load_checkpoint(round_checkpoint_path(ckpt_dir, 1)))
    assert resumed.round == 1
    rest = run_rounds(resumed)
    assert _key_metrics(rest) == _key_metrics(full)
    final = load_checkpoint(ckpt_dir / "final.pt")
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, final["model"][k]), k


def test_client_sampling_and_lr_schedule(tiny_config):
    server = server_of(tiny_config)
    fed = tiny_config.federation
    picks = [server.sample_clients(r) for r in range(1, 6)]
    assert all(len(p) == fed.clients_per_round == len(set(p)) for p in picks)
    assert picks == [server.sample_clients(r) for r in range(1, 6)]
    assert len({tuple(p) for p in picks}) > 1
    assert server.lr_for_round(1) == fed.lr
    assert abs(server.lr_for_round(fed.rounds) - fed.lr_final) < 1e-12
    assert server.lr_for_round(1) > server.lr_for_round(2) > server.lr_for_round(3)


def test_partition_and_config_must_agree(tiny_config):
    import pytest

    train, test = load_dataset(tiny_config.data)
    with pytest.raises(ValueError, match="re-run the partition stage"):
        Server(tiny_config, train, test, [torch.arange(10)], resolve_device("cpu"))
