"""Client updates in waves: one task per wave of clients, each client still retried, then dropped, on its own;
with one worker in the flow's thread the updates go straight from training to the aggregation, in memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import tasks.clients as clients
from fedmef_core.data import load_dataset
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_round
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


def _round_setup(tmp_path, monkeypatch, workers: int):
    _, config = prepare_run(tmp_path, num_clients=6, clients_per_round=5, min_clients=1)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"workers": workers,
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
    updates = clients.ClientUpdates(config, exchange, submit, in_memory=workers == 1)
    return server, updates, submitted, attempts, fail_always, fail_once, lost_waves


@pytest.fixture
def round_setup(tmp_path, monkeypatch):
    """A tiny config with 5 clients a round in 2 waves, the server, and a recording `submit`."""
    return _round_setup(tmp_path, monkeypatch, workers=2)


@pytest.fixture
def in_memory_setup(prefect_harness, tmp_path, monkeypatch):
    """The same with one worker in this thread: one in-memory wave (a real Prefect task run, here outside a
    flow run, so its logs stay off the API)."""
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        yield _round_setup(tmp_path, monkeypatch, workers=1)


def test_waves_are_contiguous_and_at_most_workers():
    assert clients.waves([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert clients.waves([7], 4) == [[7]]
    assert clients.waves(list(range(100)), 8)[-1][-1] == 99 and len(clients.waves(list(range(100)), 8)) == 8


def test_one_task_per_wave_and_the_updates_equal_the_in_process_ones(round_setup):
    server, updates, submitted, attempts, *_ = round_setup
    picked = server.sample_clients(1)
    results = updates(server.broadcast(1), picked)
    assert submitted == clients.waves(picked, 2)  # 2 tasks for 5 clients
    assert len(list(updates.exchange_dir.glob("update_*.pt"))) == len(picked) and not results.dropped
    expected = _expected(server, picked)
    arrived = []
    for r in results:  # read one at a time from disk, in client-id order, and the file is gone afterwards
        assert not clients.update_path(updates.exchange_dir, 1, r.client_id).exists()
        assert all(torch.equal(v, expected[r.client_id].state[k]) for k, v in r.state.items())
        arrived.append(r.client_id)
    assert arrived == picked and not list(updates.exchange_dir.iterdir())


def _expected(server, picked):
    return {c: clients.run_client(server.config, server.broadcast(1), c, server.train, server.parts[c],
                                  server.device) for c in picked}


def test_a_failing_client_in_a_wave_is_retried_then_dropped_while_its_wave_goes_on(round_setup, capsys):
    server, updates, submitted, attempts, fail_always, fail_once, _ = round_setup
    picked = server.sample_clients(1)
    first_wave = clients.waves(picked, 2)[0]
    fail_once.add(first_wave[0])
    fail_always.add(first_wave[1])
    results = updates(server.broadcast(1), picked)
    assert attempts[first_wave[0]] == 2  # failed once, retried, succeeded
    assert attempts[first_wave[1]] == 1 + server.config.runtime.client_retries  # then dropped
    assert results.dropped == 1
    arrived = list(results)
    assert [r.client_id for r in arrived] == [c for c in picked if c != first_wave[1]]  # the rest trained
    shown = capsys.readouterr().out  # one summary line per wave (what Prefect gets), each client on the console
    summary = f"round 1: clients {first_wave[0]}-{first_wave[-1]}: {len(first_wave) - 1} of {len(first_wave)} trained"
    assert summary in shown and "1 dropped" in shown and f"client {first_wave[2]} trained on" in shown
    metrics = server.finish_round(1, arrived, 0.0)
    assert metrics["clients"] == len(picked) - 1


def test_a_wave_lost_as_a_whole_drops_its_clients_only(round_setup):
    server, updates, submitted, attempts, fail_always, fail_once, lost_waves = round_setup
    picked = server.sample_clients(1)
    second = clients.waves(picked, 2)[1]
    lost_waves.add(second[0])
    results = updates(server.broadcast(1), picked)
    assert submitted.count(second) == 1 + server.config.runtime.client_retries  # submitted again, then dropped
    assert results.dropped == len(second)
    assert [r.client_id for r in results] == [c for c in picked if c not in second]


def test_a_wave_lost_once_is_submitted_again_and_loses_no_client(round_setup, capsys):
    server, updates, submitted, attempts, fail_always, fail_once, lost_waves = round_setup
    picked = server.sample_clients(1)
    second = clients.waves(picked, 2)[1]
    lost_waves.add(second[0])
    submit = updates.submit

    def lose_once(task, parameters):  # e.g. the node running it died; the next attempt runs elsewhere
        future = submit(task, parameters)
        lost_waves.discard(parameters["first"])
        return future

    updates.submit = lose_once
    answer = updates(server.broadcast(1), picked)
    results = list(answer)
    assert submitted == clients.waves(picked, 2) + [second]
    assert not answer.dropped and [r.client_id for r in results] == picked
    warning = f"round 1: clients {second[0]}-{second[-1]} lost (OSError: worker lost); retry 1 of 2"
    assert warning in capsys.readouterr().out


def test_too_few_clients_fail_the_round(round_setup):
    server, updates, submitted, attempts, fail_always, *_ = round_setup
    picked = server.sample_clients(1)
    fail_always.update(picked)
    with pytest.raises(clients.RoundFailedError, match="only 0 of 5"):
        updates(server.broadcast(1), picked)


# ---- one worker in the flow's thread: updates handed to the aggregation in memory ---------------------------
def test_in_memory_updates_are_trained_as_the_aggregation_reads_them_and_never_touch_disk(in_memory_setup):
    server, updates, submitted, attempts, *_ = in_memory_setup
    picked = server.sample_clients(1)
    expected = _expected(server, picked)
    attempts.clear()
    results = updates(server.broadcast(1), picked)
    assert not attempts  # nothing trained yet: each client trains when the aggregation asks for it
    arrived = []
    for r in results:
        assert attempts == {c: 1 for c in picked[: len(arrived) + 1]}
        assert all(torch.equal(v, expected[r.client_id].state[k]) for k, v in r.state.items())
        assert not list(updates.exchange_dir.iterdir())
        arrived.append(r.client_id)
    assert arrived == picked and results.dropped == 0 and not submitted  # no task runner involved


def test_in_memory_keeps_one_update_alive_at_a_time(in_memory_setup, monkeypatch):
    server, updates, *_ = in_memory_setup
    alive, most = [], []
    trained = clients.run_client

    def run_client(*args, **kwargs):
        gc.collect()
        most.append(sum(ref() is not None for ref in alive))
        result = trained(*args, **kwargs)
        alive.append(weakref.ref(result))
        return result

    monkeypatch.setattr(clients, "run_client", run_client)
    picked = server.sample_clients(1)
    server.finish_round(1, updates(server.broadcast(1), picked), 0.0)
    assert len(most) == len(picked) and max(most) == 0  # each update was folded and freed before the next trained


def test_in_memory_a_failing_client_is_retried_then_dropped_and_the_rest_are_averaged(in_memory_setup, capsys):
    from fedmef_core.aggregation import weighted_average

    server, updates, submitted, attempts, fail_always, fail_once, _ = in_memory_setup
    picked = server.sample_clients(1)
    expected = _expected(server, picked)
    attempts.clear()
    fail_once.add(picked[0])
    fail_always.add(picked[1])
    outcome = run_round(server, 1, updates)  # the round's results carry its drops, and so do its metrics
    assert attempts[picked[0]] == 2  # failed once, retried, succeeded
    assert attempts[picked[1]] == 1 + server.config.runtime.client_retries  # then dropped
    assert outcome.dropped == outcome.metrics["dropped_clients"] == 1 and outcome.metrics["clients"] == len(picked) - 1
    assert outcome.arrived == [c for c in picked if c != picked[1]] and server.history[-1] is outcome.metrics
    kept = [expected[c] for c in picked if c != picked[1]]
    average = weighted_average([r.state for r in kept], [r.num_samples for r in kept])
    assert all(torch.equal(v, average[k]) for k, v in server.model.state_dict().items())
    shown = capsys.readouterr().out
    assert f"round 1: clients {picked[0]}-{picked[-1]}: {len(picked) - 1} of {len(picked)} trained" in shown
    assert f"round 1: dropped client {picked[1]}: RuntimeError: CUDA out of memory (injected)" in shown


def test_in_memory_too_few_clients_fail_the_round_and_leave_the_model_as_it_was(in_memory_setup):
    server, updates, submitted, attempts, fail_always, *_ = in_memory_setup
    picked = server.sample_clients(1)
    fail_always.update(picked)  # federation.min_clients is 1
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    with pytest.raises(clients.RoundFailedError, match="only 0 of 5"):
        server.finish_round(1, updates(server.broadcast(1), picked), 0.0)
    assert all(torch.equal(v, before[k]) for k, v in server.model.state_dict().items())
    assert server.round == 0 and not server.history


@pytest.mark.parametrize("method, round_", [("fedmef", 1), ("fedtiny", 0)])
def test_a_fresh_worker_process_reads_a_methods_own_records_from_the_broadcast(tmp_path, method, round_):
    """A Ray worker is a fresh process: it reads the broadcast before it builds the method, so the method's own
    records (FedMef's payload on an adjustment round, FedTiny's setup candidates) must resolve there too."""
    import subprocess
    import sys

    from fedmef_core.algorithms.records import ClientResult
    from fedmef_core.checkpoint import save_exchange
    from fedmef_core.config import parse_config
    from tests.conftest import save_partition_of, server_of, standalone_env, tiny_raw

    raw = tiny_raw(tmp_path)
    raw["federation"]["clients_per_round"] = 1
    raw.update(pruning={"method": method, "density": 0.3, "adjust_interval": 1, "bn_select": round_ == 0,
                        "bn_candidates": 2}, model={"norm": "batch"}, sap={"enabled": False})
    config = parse_config(raw)
    (tmp_path / "params.yaml").write_text(config.to_yaml())
    save_partition_of(config)
    server = server_of(config)
    if round_ == 0:
        broadcast = clients.Broadcast(round=0, lr=0.0, state=server._weights_copy(),
                                      setup=server.algorithm.setup_payload(server.model, server.state))
    else:
        broadcast = server.broadcast(1)
    assert type(broadcast.payload if round_ else broadcast.setup).__module__.endswith(method)  # a record of its own
    path = save_exchange(tmp_path / "broadcast.pt", broadcast.to_dict())
    client = server.sample_clients(round_)[0]
    worker = (
        "import json, yaml; import tasks.clients as c; from fedmef_core.config import parse_config\n"
        f"config = parse_config(yaml.safe_load(open({str(tmp_path / 'params.yaml')!r})))\n"
        f"answer = c.client_wave.fn(config, {str(path)!r}, {round_}, {client}, {client}, "
        f"[{client}], {str(tmp_path)!r})\n"
        "print(json.dumps(answer['failures']))"
    )
    run = subprocess.run([sys.executable, "-c", worker], env=standalone_env(tmp_path / "home"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "{}"  # no client dropped
    update = ClientResult.from_dict(clients.load_exchange(clients.update_path(tmp_path, round_, client)))
    assert type(update.upload).__module__.endswith(method)
