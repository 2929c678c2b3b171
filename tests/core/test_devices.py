"""Devices with memory budgets: the assignment, the trace's validation, the plans, and enforcement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmef_core.budget import ClientPlan, OverBudgetError
from fedmef_core.client import run_client
from fedmef_core.config import ConfigError, DevicesConfig, ExperimentConfig, identity_of, parse_config
from fedmef_core.data import load_dataset, partition_indices
from fedmef_core.device import resolve_device
from fedmef_core.devices import DeviceTraceError, assign_devices, read_trace
from fedmef_core.engine import Server, run_rounds
from tests.conftest import tiny_raw

CPU = torch.device("cpu")
TWO_TIERS = [{"name": "small", "memory_mib": 5, "share": 0.5}, {"name": "big", "memory_mib": 64, "share": 0.5}]


def _devices(**values) -> DevicesConfig:
    return DevicesConfig.model_validate({"profile": "tiers", **values})


def _labels_and_parts(n_clients: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 5000)
    return labels, partition_indices(labels, n_clients, ExperimentConfig().partition)


def test_tiers_are_drawn_in_their_shares_reproducibly_with_the_partition_seed():
    labels, parts = _labels_and_parts(100)
    a = assign_devices(_devices(), labels, parts, 10, seed=0)
    counts = {t: a.tier_of.count(t) for t in a.tiers}
    assert counts == {"small": 40, "medium": 30, "large": 20, "xlarge": 10}  # the default tiers, exactly
    assert a.tiers == ("small", "medium", "large", "xlarge")  # smallest budget first
    assert {a.budgets_mib[c] for c in a.clients_of("small")} == {64.0}
    assert assign_devices(_devices(), labels, parts, 10, seed=0) == a
    other = assign_devices(_devices(), labels, parts, 10, seed=1)
    assert other.tier_of != a.tier_of and other.digest() != a.digest()
    odd = assign_devices(_devices(tiers=[{"name": "a", "memory_mib": 1, "share": 1 / 3},
                                         {"name": "b", "memory_mib": 2, "share": 2 / 3}]), labels, parts[:7], 10, 0)
    assert (odd.tier_of.count("a"), odd.tier_of.count("b")) == (2, 5)  # largest remainder: 2.33 -> 2, 4.67 -> 5


def test_correlated_budgets_give_the_small_devices_a_label_mix_of_their_own():
    labels, parts = _labels_and_parts(60)

    def first_half_share(a, tier):
        idx = np.concatenate([parts[c] for c in a.clients_of(tier)])
        return float(np.mean(labels[idx] < 5))

    tied = assign_devices(_devices(tiers=TWO_TIERS, correlate="labels"), labels, parts, 10, seed=0)
    free = assign_devices(_devices(tiers=TWO_TIERS), labels, parts, 10, seed=0)
    assert first_half_share(tied, "small") > 0.6 > 0.4 > first_half_share(tied, "big")
    assert abs(first_half_share(free, "small") - first_half_share(free, "big")) < 0.25
    every_small = min(np.mean(labels[parts[c]] < 5) for c in tied.clients_of("small"))
    assert every_small >= max(np.mean(labels[parts[c]] < 5) for c in tied.clients_of("big"))


def test_a_trace_gives_each_client_its_budget_and_bad_rows_are_refused_in_one_message(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("client_id,memory_mib\n2,256\n0,64\n1,64.5\n")
    assert read_trace(good, 3) == [64.0, 64.5, 256.0]
    labels, parts = _labels_and_parts(3)
    a = assign_devices(DevicesConfig(profile="trace", trace=str(good)), labels, parts, 10, seed=0)
    assert a.tiers == ("64mib", "64_5mib", "256mib") and a.tier_of[2] == "256mib"

    bad = tmp_path / "bad.csv"
    bad.write_text("client_id,memory_mib\n0,64\n0,32\n1,-5\n7,64\nx,y\n")
    with pytest.raises(DeviceTraceError) as err:
        read_trace(bad, 3)
    message = str(err.value)
    for part in ("client 0 is listed twice", "client 1 has budget -5", "client 7 does not exist",
                 "'x,y' is not a client id", "give one row per client 0..2"):
        assert part in message
    for text, expected in [("memory_mib,client_id\n0,1\n", "the header must be client_id,memory_mib"),
                           ("client_id,memory_mib\n0,64\n", "2 clients have no budget (1, 2)"),
                           ("client_id,memory_mib\n0,inf\n1,1\n2,1\n", "client 0 has budget inf")]:
        bad.write_text(text)
        with pytest.raises(DeviceTraceError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            read_trace(bad, 3)
    with pytest.raises(DeviceTraceError, match="cannot read"):
        read_trace(tmp_path / "missing.csv", 3)


def test_device_settings_are_validated_and_unlimited_devices_keep_every_identity():
    with pytest.raises(ConfigError, match="shares add up to 0.9"):
        parse_config({"devices": {"profile": "tiers", "tiers": [{"name": "a", "memory_mib": 8, "share": 0.9}]}})
    with pytest.raises(ConfigError, match="devices.trace is not set"):
        parse_config({"devices": {"profile": "trace"}})
    with pytest.raises(ConfigError, match="names repeat"):
        parse_config({"devices": {"profile": "tiers", "tiers": [{"name": "a", "memory_mib": 8, "share": 0.5},
                                                               {"name": "a", "memory_mib": 9, "share": 0.5}]}})
    with pytest.raises(ConfigError, match="memory_mib"):
        parse_config({"devices": {"profile": "tiers", "tiers": [{"name": "a", "memory_mib": -1, "share": 1}]}})
    dumped = ExperimentConfig().model_dump(mode="json")
    before_devices = {k: v for k, v in dumped.items() if k != "devices"}
    assert identity_of(dumped) == identity_of(before_devices)  # run folders and sweep cells stay where they were
    off = parse_config({"devices": {"policy": "fit_batch"}}).identity()
    assert off == ExperimentConfig().identity()  # settings of a profile that is off change nothing
    tiers = parse_config({"devices": {"profile": "tiers"}}).identity()
    assert tiers != off and tiers["devices"]["profile"] == "tiers"


def _server(method: str = "fedmef", **devices) -> Server:
    raw = tiny_raw()
    raw["pruning"] = {"method": method, "adjust_interval": 2, "adjust_until": 2}
    if devices:
        raw["devices"] = {"profile": "tiers", "tiers": TWO_TIERS, **devices}
    config = parse_config(raw)
    train, test = load_dataset(config.data)
    parts = partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)
    return Server(config, train, test, parts, resolve_device("cpu"))


def test_clients_that_do_not_fit_are_excluded_and_the_others_train_as_configured():
    server = _server(policy="exclude")
    history = run_rounds(server)
    small = set(server.fleet.assignment.clients_of("small"))
    for rnd, h in enumerate(history, start=1):
        sampled = server.sample_clients(rnd)
        assert h["devices/sampled"] == len(sampled)
        assert h["devices/excluded"] == h["devices/small/excluded"] == len(small & set(sampled))
        assert h["clients"] == h["devices/trained"] == len(set(sampled) - small)
    big = [r for r in server.device_rows if r["tier"] == "big"]
    assert big and all(r["status"] == "trained" and r["batch_size"] == 32 for r in big)
    # what each trained client held, measured, is what the planner predicted (SAP's share: within 2%)
    assert all(abs(r["held_mib"] / r["predicted_mib"] - 1) < 0.02 and r["held_mib"] <= 64 for r in big)


def test_fit_batch_trains_small_devices_at_the_batch_that_fits_within_their_budget():
    server = _server("feddst", policy="fit_batch")
    fit = server.fleet.fits[5.0]
    assert fit.fits and server.config.devices.min_batch <= fit.batch_size < 32
    plan = server.plan_round(1)
    assert not plan.excluded and plan.trained == server.sample_clients(1)
    small = next(c for c in plan.trained if plan.plans[c].tier == "small")
    result = run_client(server.config, server.broadcast(1, plan), small, server.train, server.parts[small], CPU)
    n = len(server.parts[small])
    assert result.steps == math.ceil(n / fit.batch_size)  # one local epoch at the device's batch
    assert fit.bound_mib <= result.memory["held_mib"] * 1.0001 and result.memory["held_mib"] <= 5.0


def test_accumulate_keeps_the_batch_and_its_steps_in_micro_batches_within_the_budget():
    """The small tier's configured batch does not fit its 5 MiB: `exclude` leaves it out, `accumulate` trains it
    at the configured batch (the same optimizer steps) in micro-batches that fit, measured within the budget."""
    excluded = _server("feddst", policy="exclude").plan_round(1)
    assert excluded.excluded  # the small tier does not fit at batch 32
    server = _server("feddst", policy="accumulate")
    fit = server.fleet.fits[5.0]
    assert fit.fits and server.config.devices.min_batch <= fit.batch_size < 32
    plan = server.plan_round(1)
    assert not plan.excluded and plan.trained == server.sample_clients(1)
    small = next(c for c in plan.trained if plan.plans[c].tier == "small")
    assert (plan.plans[small].batch_size, plan.plans[small].micro_batch) == (32, fit.batch_size)
    result = run_client(server.config, server.broadcast(1, plan), small, server.train, server.parts[small], CPU)
    n = len(server.parts[small])
    assert result.steps == math.ceil(n / 32)  # one local epoch at the configured batch: its steps, not more
    assert fit.bound_mib <= result.memory["held_mib"] * 1.0001 and result.memory["held_mib"] <= 5.0
    big = next(c for c in plan.trained if plan.plans[c].tier == "big")
    assert plan.plans[big].micro_batch is None  # a client whose batch fits trains it whole


def test_enforcement_catches_a_wrong_plan_as_a_device_out_of_memory():
    server = _server("fedmef", policy="exclude")
    plan = server.plan_round(1)
    client = plan.trained[0]
    right = plan.plans[client]
    # a planner that under-predicts by half: the plan says the step fits a budget it cannot fit
    plan.plans[client] = ClientPlan(tier=right.tier, budget_mib=right.predicted_mib / 2, batch_size=32,
                                    gamma=right.gamma, bound="footprint", predicted_mib=right.predicted_mib / 2)
    with pytest.raises(OverBudgetError, match=r"over its .* MiB budget \(footprint; planned"):
        run_client(server.config, server.broadcast(1, plan), client, server.train, server.parts[client], CPU)
    metrics = server.finish_round(1, run_rounds_executor(server)(server.broadcast(1, plan), plan.trained), 0.0, plan)
    assert metrics["devices/over_budget"] == 1 and metrics["clients"] == len(plan.trained) - 1
    assert [r["status"] for r in server.device_rows if r["client_id"] == client] == ["over_budget"]
    # the guard is off when the plan says so: the same step then trains
    plan.plans[client] = ClientPlan(**{**plan.plans[client].to_dict(), "enforce": False})
    result = run_client(server.config, server.broadcast(1, plan), client, server.train, server.parts[client], CPU)
    assert result.memory == {} and result.steps > 0


def run_rounds_executor(server):
    from fedmef_core.executors import streaming_executor

    return streaming_executor(server)


def test_a_round_whose_clients_are_all_excluded_leaves_the_model_as_it_was():
    server = _server("fedavg", policy="exclude", tiers=[{"name": "tiny", "memory_mib": 1, "share": 1.0}])
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    history = run_rounds(server)
    assert all(h["clients"] == 0 and h["devices/excluded"] == h["devices/sampled"] for h in history)
    assert all(torch.equal(v, before[k]) for k, v in server.model.state_dict().items())
    assert "train_loss" not in history[0] and "accuracy" in history[-1]


def test_budgets_that_bind_no_client_change_nothing_bit_for_bit():
    free = run_rounds(_server("fedmef"))
    roomy = _server("fedmef", policy="fit_gamma", tiers=[{"name": "all", "memory_mib": 64, "share": 1.0}])
    bound = run_rounds(roomy)  # every client measured against its budget, at the configured batch and gamma
    keys = ("accuracy", "loss", "train_loss")
    assert [[h[k] for k in keys] for h in bound] == [[h[k] for k in keys] for h in free]
    assert all(h["devices/trained"] == h["devices/sampled"] for h in bound)


def test_a_trace_saved_with_a_byte_order_mark_reads_and_a_huge_budget_is_refused(tmp_path):
    from fedmef_core.devices import DeviceTraceError, read_trace

    trace = tmp_path / "t.csv"
    trace.write_bytes(b"\xef\xbb\xbfclient_id,memory_mib\r\n0,64\r\n1,128\r\n")  # as Excel saves a CSV
    assert read_trace(trace, 2) == [64.0, 128.0]
    trace.write_text("client_id,memory_mib\n0,64\n1,1.7e308\n")
    with pytest.raises(DeviceTraceError, match="client 1 has budget 1.7e308"):
        read_trace(trace, 2)
