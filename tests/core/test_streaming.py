"""Streaming aggregation: results folded one at a time are bit-identical to the list-based aggregation,
whatever order they arrive in, and no more than one client update is alive at a time."""

import copy
import gc
import random
import weakref

import pytest
import torch

from fedmef_core.aggregation import weighted_average
from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset, partition_indices
from fedmef_core.device import resolve_device
from fedmef_core.engine import RoundResults, Server, local_executor, run_rounds
from tests.conftest import tiny_raw

METHODS = ["fedavg", "fedavg_static", "feddst", "fedtiny", "fedmef", "prunefl"]


def _config(method, **pruning):
    raw = tiny_raw()
    raw["data"]["train_limit"] = 600
    raw["federation"].update(rounds=2, clients_per_round=4)
    if method != "fedavg":  # every round adjusts
        raw["pruning"] = {"method": method, "density": 0.2, "adjust_interval": 1, "adjust_until": 4, **pruning}
    if method == "fedmef":
        raw["sap"] = {"enabled": False}  # client-side only; keeps the test quick
    return parse_config(raw)


@pytest.fixture(scope="module")
def data():
    cfg = _config("fedavg")
    train, test = load_dataset(cfg.data)
    return train, test, partition_indices(train.labels.numpy(), cfg.federation.num_clients, cfg.partition)


def _server(config, data):
    train, test, parts = data
    return Server(config, train, test, parts, resolve_device("cpu"))


def _reference_sums(method, results, masks):
    """What the list-based aggregation (before streaming) computed from the round's results (client-id order)."""
    total = float(sum(r.num_samples for r in results))
    if method in ("fedtiny", "fedmef"):
        scores = {}
        for name, mask in masks.items():
            scores[name] = torch.zeros(mask.numel(), dtype=torch.float64)
            for r in results:
                scores[name].index_add_(0, r.upload["grad_idx"][name].long(),
                                        r.upload["grad_val"][name].double() * (r.num_samples / total))
        out = {"scores": scores}
        if method == "fedmef":
            out.update({key: sum(r.upload[key] * r.num_samples for r in results) / total
                        for key in ("low_norm_start", "low_norm_end")})
        return out
    if method == "prunefl":
        return {"importance": {k: sum(r.upload["grad2"][k].double() * (r.num_samples / total) for r in results)
                               for k in masks}}
    if method == "feddst":
        num, votes = {}, {}
        for name, mask in masks.items():
            num[name] = torch.zeros(mask.shape, dtype=torch.float64)
            votes[name] = torch.zeros(mask.shape, dtype=torch.float64)
            for r in results:
                m = r.upload["mask"][name]
                num[name] += r.state[name].double() * m * r.num_samples
                votes[name] += m.double() * (r.num_samples / total)
        return {"num": num, "votes": votes}
    return {}


def _assert_identical(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("method", METHODS)
def test_streamed_sums_are_bit_identical_to_the_list_based_aggregation_in_any_arrival_order(method, data):
    server = _server(_config(method), data)
    results = local_executor(server)(server.broadcast(1), server.sample_clients(1))
    in_order = sorted(results, key=lambda r: r.client_id)
    shuffled = in_order[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != in_order

    streamed = RoundResults.of(shuffled)
    aggregator = server.algorithm.aggregator(1, server.model, server.state, streamed.total_samples)
    for r in streamed:
        aggregator.add(r)
    _assert_identical(aggregator.average.result(),
                      weighted_average([r.state for r in in_order], [r.num_samples for r in in_order]))
    reference = _reference_sums(method, in_order, server.state.get("masks", {}))
    for key, value in reference.items():
        got = aggregator.sums[key]
        _assert_identical(sum(got) / aggregator.sums["total"] if isinstance(got, list) else got, value)
    if reference:
        assert aggregator.sums["adjust"]  # an adjustment round: its sums were compared too

    # and the whole round (average, prune and grow, metrics) does not depend on the arrival order
    a, b = copy.deepcopy(server), copy.deepcopy(server)
    ma, mb = a.finish_round(1, shuffled, 0.0), b.finish_round(1, in_order, 0.0)
    assert {k: v for k, v in ma.items() if k != "round_seconds"} == {k: v for k, v in mb.items()
                                                                     if k != "round_seconds"}
    _assert_identical(a.model.state_dict(), b.model.state_dict())
    _assert_identical(a.state, b.state)


def test_only_one_client_update_is_alive_at_a_time(data):
    server = _server(_config("fedtiny"), data)
    broadcast, clients = server.broadcast(1), server.sample_clients(1)
    trained = local_executor(server)(broadcast, clients)
    alive: list[weakref.ref] = []
    most = []

    def fetch(c):  # e.g. a read from disk: a fresh object the caller alone holds
        gc.collect()
        most.append(sum(ref() is not None for ref in alive))
        result = copy.deepcopy(next(r for r in trained if r.client_id == c))
        alive.append(weakref.ref(result))
        return result

    server.finish_round(1, RoundResults({r.client_id: r.num_samples for r in trained}, fetch), 0.0)
    assert len(most) == len(clients) and max(most) == 0  # each earlier update was released before the next read


def test_the_bare_loop_streams_and_matches_the_list_executor(data):
    config = _config("fedavg_static")
    streamed, listed = _server(config, data), _server(config, data)
    h1 = run_rounds(streamed)
    h2 = run_rounds(listed, local_executor(listed))
    assert [{k: v for k, v in m.items() if k != "round_seconds"} for m in h1] == \
        [{k: v for k, v in m.items() if k != "round_seconds"} for m in h2]
    _assert_identical(streamed.model.state_dict(), listed.model.state_dict())
    assert all(m["round_seconds"] > 0 for m in h1)  # the clients' training is timed while it streams


def test_results_whose_weights_do_not_add_up_to_the_announced_total_are_refused(data):
    server = _server(_config("fedavg"), data)
    results = local_executor(server)(server.broadcast(1), server.sample_clients(1))
    lying = RoundResults({r.client_id: r.num_samples + 1 for r in results},
                         {r.client_id: r for r in results}.__getitem__)
    with pytest.raises(ValueError, match="announced total"):
        server.finish_round(1, lying, 0.0)
