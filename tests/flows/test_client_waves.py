"""Client updates in waves: one task per wave of clients, each client still retried, then dropped, on its own."""

from __future__ import annotations

import pytest
import torch

import tasks.clients as clients
from fedmef_core.data import load_dataset
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server
from tests.conftest import prepare_run, save_partition_of


class Finished:
    """What `submit` returns: the task body's answer, or its exception at `result()`."""

    def __init__(self, fn):
        try:
            self.value, self.error = fn(), None
        except Exception as exc:  # noqa: BLE001
            self.value, self.error = None, exc

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
def round_setup(tmp_path, monkeypatch):
    """A tiny config with 5 clients a round in 2 waves, the server, and a recording `submit`."""
    _, config = prepare_run(tmp_path, num_clients=6, clients_per_round=5, min_clients=1)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"workers": 2,
                                                                                   "client_retries": 2})})
    parts = save_partition_of(config)
    train, test = load_dataset(config.data)
    server = Server(config, train, test, parts, resolve_device("cpu"))
    submitted, lost_waves = [], set()

    def submit(task, parameters):
        submitted.append(parameters["clients"])
        if parameters["first"] in lost_waves:  # e.g. the worker running the wave died
            return Finished(lambda: (_ for _ in ()).throw(OSError("worker lost")))
        return Finished(lambda: task.fn(**parameters))

    attempts: dict[int, int] = {}
    fail_always, fail_once = set(), set()
    real = clients.run_client

    def run_client(config, broadcast, client_id, *args, **kwargs):  # a fault we cannot cause on CPU
        attempts[client_id] = attempts.get(client_id, 0) + 1
        if client_id in fail_always or (client_id in fail_once and attempts[client_id] == 1):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(config, broadcast, client_id, *args, **kwargs)

    monkeypatch.setattr(clients, "run_client", run_client)
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    updates = clients.ClientUpdates(config, exchange, submit)
    return server, updates, submitted, attempts, fail_always, fail_once, lost_waves


def test_waves_are_contiguous_and_at_most_workers():
    assert clients.waves([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert clients.waves([7], 4) == [[7]]
    assert clients.waves(list(range(100)), 8)[-1][-1] == 99 and len(clients.waves(list(range(100)), 8)) == 8


def test_one_task_per_wave_and_the_updates_equal_the_in_process_ones(round_setup):
    server, updates, submitted, attempts, *_ = round_setup
    picked = server.sample_clients(1)
    results = updates(server.broadcast(1), picked)
    assert submitted == clients.waves(picked, 2)  # 2 tasks for 5 clients
    assert list(results.samples) == picked and not updates.dropped[1]
    expected = {c: clients.run_client(server.config, server.broadcast(1), c, server.train, server.parts[c],
                                      server.device) for c in picked}
    for r in results:  # read one at a time from disk, in client-id order, and the file is gone afterwards
        assert not clients.update_path(updates.exchange_dir, 1, r.client_id).exists()
        assert all(torch.equal(v, expected[r.client_id].state[k]) for k, v in r.state.items())
    assert not list(updates.exchange_dir.iterdir())


def test_a_failing_client_in_a_wave_is_retried_then_dropped_while_its_wave_goes_on(round_setup, capsys):
    server, updates, submitted, attempts, fail_always, fail_once, _ = round_setup
    picked = server.sample_clients(1)
    first_wave = clients.waves(picked, 2)[0]
    fail_once.add(first_wave[0])
    fail_always.add(first_wave[1])
    results = updates(server.broadcast(1), picked)
    assert attempts[first_wave[0]] == 2  # failed once, retried, succeeded
    assert attempts[first_wave[1]] == 1 + server.config.runtime.client_retries  # then dropped
    assert updates.dropped[1] == 1
    assert list(results.samples) == [c for c in picked if c != first_wave[1]]  # the rest of its wave trained
    shown = capsys.readouterr().out  # one summary line per wave (what Prefect gets), each client on the console
    summary = f"round 1: clients {first_wave[0]}-{first_wave[-1]}: {len(first_wave) - 1} of {len(first_wave)} trained"
    assert summary in shown and "1 dropped" in shown and f"client {first_wave[2]} trained on" in shown
    metrics = server.finish_round(1, results, 0.0)
    assert metrics["clients"] == len(picked) - 1


def test_a_wave_lost_as_a_whole_drops_its_clients_only(round_setup):
    server, updates, submitted, attempts, fail_always, fail_once, lost_waves = round_setup
    picked = server.sample_clients(1)
    second = clients.waves(picked, 2)[1]
    lost_waves.add(second[0])
    results = updates(server.broadcast(1), picked)
    assert updates.dropped[1] == len(second)
    assert list(results.samples) == [c for c in picked if c not in second]


def test_too_few_clients_fail_the_round(round_setup):
    server, updates, submitted, attempts, fail_always, *_ = round_setup
    picked = server.sample_clients(1)
    fail_always.update(picked)
    with pytest.raises(clients.RoundFailedError, match="only 0 of 5"):
        updates(server.broadcast(1), picked)
