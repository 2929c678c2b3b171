"""Streaming aggregation: results folded one at a time are bit-identical to the list-based aggregation,
whatever order they arrive in, no more than one client update is alive at a time, and nothing about the
results is needed up front."""

import copy
import gc
import random
import weakref

import pytest
import torch

from fedmef_core.aggregation import weighted_average
from fedmef_core.algorithms.base import Aggregator
from fedmef_core.engine import run_rounds
from fedmef_core.executors import RoundResults, local_executor
from tests.conftest import server_of, tiny_with
from tests.core.conftest import SMALL_DATA

METHODS = ["fedavg", "fedavg_static", "feddst", "fedtiny", "fedmef", "prunefl"]


def _config(method, **pruning):
    every_round = {"method": method, "density": 0.2, "adjust_interval": 1, "adjust_until": 4, **pruning}
    return tiny_with(data=SMALL_DATA, federation={"rounds": 2, "clients_per_round": 4},
                     pruning=every_round if method != "fedavg" else {},
                     sap={"enabled": False} if method == "fedmef" else {})  # SAP: client-side only; keeps it quick


def _reference_sums(method, results, masks):
    """The list-based aggregation's sums over the round's results (client-id order), weighted by sample counts."""
    total = float(sum(r.num_samples for r in results))
    if method in ("fedtiny", "fedmef"):
        scores = {}
        for name, mask in masks.items():
            scores[name] = torch.zeros(mask.numel(), dtype=torch.float64)
            for r in results:
                scores[name].index_add_(0, r.upload.grad_idx[name].long(),
                                        r.upload.grad_val[name].double() * r.num_samples)
        out = {"scores": scores}
        if method == "fedmef":
            out.update({key: sum(getattr(r.upload, key) * r.num_samples for r in results) / total
                        for key in ("low_norm_start", "low_norm_end")})
        return out
    if method == "prunefl":
        return {"importance": {k: sum(r.upload.grad2[k].double() * r.num_samples for r in results)
                               for k in masks}}
    if method == "feddst":
        num, votes = {}, {}
        for name, mask in masks.items():
            num[name] = torch.zeros(mask.shape, dtype=torch.float64)
            votes[name] = torch.zeros(mask.shape, dtype=torch.float64)
            for r in results:
                m = r.upload.mask[name]
                num[name] += r.state[name].double() * m * r.num_samples
                votes[name] += m.double() * r.num_samples
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
    server = server_of(_config(method), data)
    results = local_executor(server)(server.broadcast(1), server.sample_clients(1))
    in_order = sorted(results, key=lambda r: r.client_id)
    shuffled = in_order[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != in_order

    streamed = RoundResults.of(shuffled)
    aggregator = Aggregator(server.algorithm, 1, server.model, server.state)
    for r in streamed:
        aggregator.add(r)
    _assert_identical(aggregator.average.result(),
                      weighted_average([r.state for r in in_order], [r.num_samples for r in in_order]))
    reference = _reference_sums(method, in_order, server.state.masks or {})
    for key, value in reference.items():
        got = getattr(aggregator.sums.adjustment, key)
        _assert_identical(sum(got) / aggregator.sums.samples if isinstance(got, list) else got, value)
    if reference:
        assert aggregator.sums.adjusting  # an adjustment round: its sums were compared too

    # and the whole round (average, prune and grow, metrics) does not depend on the arrival order
    a, b = copy.deepcopy(server), copy.deepcopy(server)
    ma, mb = a.finish_round(1, shuffled, 0.0), b.finish_round(1, in_order, 0.0)
    assert {k: v for k, v in ma.items() if k != "round_seconds"} == {k: v for k, v in mb.items()
                                                                     if k != "round_seconds"}
    _assert_identical(a.model.state_dict(), b.model.state_dict())
    _assert_identical(a.state.to_wire(), b.state.to_wire())


def test_only_one_client_update_is_alive_at_a_time(data):
    server = server_of(_config("fedtiny"), data)
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

    server.finish_round(1, RoundResults.fetched([r.client_id for r in trained], fetch), 0.0)
    assert len(most) == len(clients) and max(most) == 0  # each earlier update was released before the next read


def test_the_bare_loop_streams_and_matches_the_list_executor(data):
    config = _config("fedavg_static")
    streamed, listed = server_of(config, data), server_of(config, data)
    h1 = run_rounds(streamed)
    h2 = run_rounds(listed, local_executor(listed))
    assert [{k: v for k, v in m.items() if k != "round_seconds"} for m in h1] == \
        [{k: v for k, v in m.items() if k != "round_seconds"} for m in h2]
    _assert_identical(streamed.model.state_dict(), listed.model.state_dict())
    assert all(m["round_seconds"] > 0 for m in h1)  # the clients' training is timed while it streams


def test_dividing_at_the_end_is_within_one_float32_step_of_the_average_of_shares_it_replaced(data):
    """The average is folded as sum_k n_k w_k / sum_k n_k (no total needed up front); before, as
    sum_k (n_k / N) w_k. Both sum in float64, so the float32 model differs at most by one step of the last
    bit, and only where the float64 value sat on a rounding boundary (here ~1 entry in 10,000)."""
    server = server_of(_config("fedavg"), data)
    results = sorted(local_executor(server)(server.broadcast(1), server.sample_clients(1)), key=lambda r: r.client_id)
    total = sum(r.num_samples for r in results)
    shares = {}
    for k, v in results[0].state.items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for r in results:
                acc.add_(r.state[k].double(), alpha=r.num_samples / total)
            shares[k] = acc.to(v.dtype)
    server.finish_round(1, results, 0.0)
    model = server.model.state_dict()
    entries = differing = 0
    for k, old in shares.items():
        step = torch.maximum(torch.nextafter(old, torch.full_like(old, float("inf"))) - old,
                             old - torch.nextafter(old, torch.full_like(old, float("-inf"))))
        assert bool(((model[k] - old).abs() <= step).all()), k
        entries, differing = entries + old.numel(), differing + int((model[k] != old).sum())
    assert differing < entries / 1000


def test_a_client_that_never_arrives_leaves_the_average_of_those_that_did(data):
    server = server_of(_config("fedavg"), data)
    results = sorted(local_executor(server)(server.broadcast(1), server.sample_clients(1)), key=lambda r: r.client_id)
    arrived = results[:1] + results[2:]  # the second client dropped half-way through the round
    metrics = server.finish_round(1, RoundResults(iter(arrived)), 0.0)
    expected = weighted_average([r.state for r in arrived], [r.num_samples for r in arrived])
    _assert_identical(server.model.state_dict(), expected)
    assert metrics["clients"] == len(arrived)
    assert metrics["train_loss"] == pytest.approx(sum(r.train_loss * r.num_samples for r in arrived)
                                                  / sum(r.num_samples for r in arrived))


def test_a_round_with_no_result_is_refused(data):
    server = server_of(_config("fedavg"), data)
    with pytest.raises(ValueError, match="no client result"):
        server.finish_round(1, RoundResults(iter([])), 0.0)
