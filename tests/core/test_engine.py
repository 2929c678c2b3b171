import torch

from fedmef_core.checkpoint import load_checkpoint, round_checkpoint_path, round_checkpoints
from fedmef_core.data import load_dataset
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_rounds
from fedmef_core.executors import ClientExecutor, streaming_executor
from fedmef_core.rounds import Checkpoints, RoundObserver
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


def test_the_checkpoint_schedule_is_every_nth_round_and_the_last():
    assert [r for r in range(1, 8) if Checkpoints("unused", every=3, rounds=7).due(r)] == [3, 6, 7]


class Recorder(RoundObserver):
    def __init__(self):
        self.seen = []

    def round_done(self, server, outcome):
        self.seen.append((outcome.round, outcome.trained, outcome.arrived, outcome.dropped, dict(outcome.metrics)))

    def training_done(self, server):
        self.seen.append("done")


def test_a_round_carries_its_drops_where_the_executor_drops_clients(tiny_config):
    plain, recorder = run_rounds(server_of(tiny_config)), Recorder()
    assert all("dropped_clients" not in row for row in plain)  # in-process: a failing client fails the run

    server = server_of(tiny_config)
    stream = streaming_executor(server)

    class LosesItsFirstClient(ClientExecutor):
        drops_clients = True

        def __call__(self, broadcast, clients):
            results = stream(broadcast, clients[1:])
            results.dropped = 1
            return results

    history = run_rounds(server, LosesItsFirstClient(), observers=[recorder])
    assert [list(row)[-1] for row in history] == ["dropped_clients"] * 3 and all(r["dropped_clients"] == 1
                                                                                  for r in history)
    assert recorder.seen[-1] == "done" and [s[0] for s in recorder.seen[:-1]] == [1, 2, 3]
    for rnd, trained, arrived, dropped, metrics in recorder.seen[:-1]:
        assert arrived == trained[1:] and dropped == 1 and metrics == history[rnd - 1]
        assert metrics["clients"] == len(trained) - 1
