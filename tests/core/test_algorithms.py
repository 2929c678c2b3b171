"""The sparse methods on the real tiny experiment (Fashion-MNIST, 6 clients, 2 rounds of 2 clients)."""

import pytest
import torch

from fedmef_core.algorithms import MaskedAlgorithm, build_algorithm
from fedmef_core.client import local_train
from fedmef_core.config import parse_config
from fedmef_core.engine import run_rounds
from fedmef_core.executors import local_executor
from fedmef_core.models import prunable_weights
from fedmef_core.registry import METHODS
from fedmef_core.sparse import smallest_active
from tests.conftest import server_of, tiny_raw, tiny_with
from tests.core.conftest import SMALL_DATA

SPARSE = ["fedavg_static", "feddst", "fedtiny", "prunefl", "fedmef"]


def _config(method, norm="batch", **pruning):
    """Every method on the same BatchNorm CNN, so their mechanics compare one to one (FedMef's own default,
    NSConv + SAP, is tested with `norm="auto"` and in test_nsconv/test_sap)."""
    return tiny_with(data=SMALL_DATA, model={"norm": norm}, federation={"rounds": 2, "clients_per_round": 2},
                     pruning={"method": method, "density": 0.1, "adjust_interval": 1, "adjust_until": 4,
                              "adjust_alpha": 0.3, **pruning})


def _run_and_check(config, data):
    """Run all rounds; after every aggregation check density and zeros outside the mask."""
    server = server_of(config, data)
    total = sum(m.numel() for m in server.state.masks.values())
    want = round(config.pruning.density * total)
    counts = {k: int(m.sum()) for k, m in server.state.masks.items()}
    snapshots = []

    def on_round(rnd, metrics):
        masks = server.state.masks
        weights = prunable_weights(server.model)
        assert sum(int(m.sum()) for m in masks.values()) == want
        assert metrics["density"] == want / total
        for k, m in masks.items():
            assert torch.all(weights[k][~m] == 0), (rnd, k)
            assert metrics[f"density/{k}"] == int(m.sum()) / m.numel()
        if not (config.pruning.method == "prunefl" and config.pruning.prunefl_reallocate):
            assert {k: int(m.sum()) for k, m in masks.items()} == counts  # per-layer counts fixed
        assert metrics["comm/upload_bytes"] > 0 and metrics["comm/download_bytes"] > 0
        snapshots.append({k: m.clone() for k, m in masks.items()})

    history = run_rounds(server, on_round=on_round)
    return server, history, snapshots


@pytest.fixture(scope="module")
def runs(data):
    return {m: _run_and_check(_config(m), data) for m in SPARSE}


def test_registry_lists_every_method():
    assert set(METHODS) == {"fedavg", *SPARSE}
    assert all(issubclass(METHODS[m].load(), MaskedAlgorithm) for m in SPARSE)


@pytest.mark.parametrize("method", SPARSE)
def test_density_is_exact_and_masked_weights_zero_every_round(runs, method):
    server, history, snapshots = runs[method]
    assert all(0 <= h["accuracy"] <= 1 for h in history)
    adjusted = [h for h in history if h.get("adjusted")]
    if method == "fedavg_static":
        assert not adjusted
        assert all(torch.equal(snapshots[0][k], s[k]) for s in snapshots for k in s)
    else:
        assert [h["round"] for h in adjusted] == [1, 2]
        assert all(h["pruned"] == h["grown"] > 0 for h in adjusted)
        assert any(not torch.equal(snapshots[0][k], snapshots[-1][k]) for k in snapshots[0])


def test_upload_costs_reflect_what_each_method_sends(runs):
    up = {m: runs[m][1][0]["comm/upload_bytes"] for m in SPARSE}
    assert up["fedavg_static"] < up["fedtiny"] == up["fedmef"] < up["prunefl"]  # top-k < dense grad^2
    assert up["fedavg_static"] < up["feddst"]  # + mask bitmaps
    down = {m: runs[m][1][0]["comm/download_bytes"] for m in SPARSE}
    assert down["fedmef"] > down["fedtiny"] == down["fedavg_static"]  # + theta_low indices


def test_same_seed_same_masks_and_metrics(runs, data):
    for method in ("fedmef",):
        _, history, snapshots = _run_and_check(_config(method), data)
        _, ref_history, ref_snapshots = runs[method]
        drop = ("round_seconds",)
        assert [{k: v for k, v in h.items() if k not in drop} for h in history] == [
            {k: v for k, v in h.items() if k not in drop} for h in ref_history
        ]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(snapshots, ref_snapshots) for k in a)


def _one_client(method, data, rnd=1, **pruning):
    """The global model, the payload of adjustment round `rnd`, and a client's trained copy."""
    config = _config(method, **pruning)
    server = server_of(config, data)
    payload = server.algorithm.round_payload(rnd, server.model, server.state)
    model = type(server.model)(1, 10, 28, lambda c: torch.nn.BatchNorm2d(c))
    model.load_state_dict(server.model.state_dict())
    algorithm = build_algorithm(config)
    return config, server, payload, model, algorithm


def _client_rounds(algorithm, patch=None):
    """The client rounds `algorithm` makes from now on (a list that fills as local training starts); `patch(round)`
    may wrap a round's hooks before the loop calls them."""
    made, original = [], algorithm.client_round

    def client_round(model, payload):
        client = original(model, payload)
        if patch is not None:
            patch(client)
        made.append(client)
        return client

    algorithm.client_round = client_round
    return made


def _checking_masked_weights(client):
    original = client.after_step

    def checked():
        original()
        for k, mask in client.masks.items():  # the client's current mask (FedDST changes it midway)
            assert torch.all(client.weights[k][~mask] == 0)

    client.after_step = checked


def _train(config, data, model, algorithm, payload, check_steps=True):
    train, _, parts = data
    if check_steps:
        _client_rounds(algorithm, _checking_masked_weights)
    return local_train(model, train, parts[0], config=config, algorithm=algorithm, payload=payload, lr=0.05,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))


@pytest.mark.parametrize("method", ["fedavg_static", "feddst", "fedmef"])
def test_masked_weights_are_zero_after_every_optimizer_step(method, data):
    config, _, payload, model, algorithm = _one_client(method, data)
    result = _train(config, data, model, algorithm, payload)
    assert result.steps > 0


def _low_norm(model, payload):
    weights = prunable_weights(model)
    return sum(float(weights[k].detach().flatten()[i].norm()) for k, i in payload.low.items())


def test_bae_shrinks_the_marked_weights_within_one_round_and_lr_respects_xi(data):
    config, server, payload, model, algorithm = _one_client("fedmef", data, bae_lambda=0.5, bae_xi=0.08,
                                                            bae_psi=3.0)
    weights = prunable_weights(server.model)
    for k, idx in payload.low.items():  # theta_low = the k_l smallest active weights
        assert torch.equal(idx, smallest_active(weights[k], server.state.masks[k], payload.k[k]))
        assert idx.numel() == payload.k[k]
    before = _low_norm(model, payload)
    clients = _client_rounds(algorithm)
    _train(config, data, model, algorithm, payload, check_steps=False)
    after_bae = _low_norm(model, payload)
    lr_trace = clients[0].bae.lr_trace
    # psi * beta_0 ~ 3 * eta_0 = 0.15 > xi: capped at xi; never below the round's lr (0.05)
    assert lr_trace[0] == pytest.approx(0.08)
    assert max(lr_trace) <= 0.08 and min(lr_trace) >= 0.05
    assert lr_trace[-1] < 0.08  # the budget profile p(t) decays over the round
    assert not hasattr(algorithm, "lr_trace")  # what a client computes stays with its round
    # the same client without extrusion (FedTiny) keeps theta_low larger
    config_t, _, _, model_t, algorithm_t = _one_client("fedtiny", data)
    _train(config_t, data, model_t, algorithm_t, payload, check_steps=False)
    after_plain = _low_norm(model_t, payload)
    assert after_bae < 0.8 * after_plain, (before, after_bae, after_plain)
    assert after_bae < 0.8 * before


def test_budget_profile():
    from fedmef_core.algorithms.fedmef import budget_profile

    assert budget_profile(0, 10) == 1.0 and budget_profile(10, 10) == 0.0
    assert budget_profile(5, 10) == pytest.approx(10 / 15)


def test_feddst_union_and_prune_back(data):
    config = _config("feddst")
    server = server_of(config, data)
    old = {k: m.clone() for k, m in server.state.masks.items()}
    payload = server.algorithm.round_payload(1, server.model, server.state)
    results = []
    for c in (0, 1):
        train, _, parts = data
        model = type(server.model)(1, 10, 28, lambda ch: torch.nn.BatchNorm2d(ch))
        model.load_state_dict(server.model.state_dict())
        alg = build_algorithm(config)
        r = local_train(model, train, parts[c], config=config, algorithm=alg, payload=payload, lr=0.05,
                        generator=torch.Generator().manual_seed(c), device=torch.device("cpu"), client_id=c)
        for k, m in r.upload.mask.items():  # each client moved exactly k_l
            assert int(m.sum()) == int(old[k].sum())
            assert int((m & ~old[k]).sum()) == payload.k[k]
        results.append(r)
    metrics = server.finish_round(1, results, 0.0)
    weights = prunable_weights(server.model)
    total = sum(r.num_samples for r in results)
    for k, new in server.state.masks.items():
        union = results[0].upload.mask[k] | results[1].upload.mask[k]
        assert not torch.any(new & ~union)  # the new mask lies inside the union
        assert int(new.sum()) == int(old[k].sum())  # pruned back to the layer's count
        # coordinate-wise average over the clients holding it
        m0, m1 = (r.upload.mask[k] for r in results)
        n0, n1 = (r.num_samples for r in results)
        both = new & m0 & m1
        expect = (results[0].state[k] * n0 + results[1].state[k] * n1) / (n0 + n1)
        assert torch.allclose(weights[k][both], expect[both].float(), atol=1e-6)
        only0 = new & m0 & ~m1
        assert torch.allclose(weights[k][only0], results[0].state[k][only0])
        # kept weights are the largest magnitudes of the union average
        kept_min = weights[k][new].abs().min()
        dropped = union & ~new
        if dropped.any():
            avg = torch.where(m0 & m1, expect, torch.where(m0, results[0].state[k], results[1].state[k]))
            assert avg[dropped].abs().max() <= kept_min + 1e-7
    assert metrics["pruned"] == metrics["grown"] > 0
    assert total > 0


def test_dense_fedavg_reports_dense_communication():
    from fedmef_core.algorithms import ClientResult, FederatedAlgorithm
    from fedmef_core.algorithms.base import Aggregator
    from fedmef_core.algorithms.records import ServerState

    model = torch.nn.Linear(4, 3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    aggregator = Aggregator(FederatedAlgorithm(_config("fedavg")), 1, model, ServerState())
    for i in range(2):
        aggregator.add(ClientResult(client_id=i, num_samples=5, state=state, train_loss=0.0, steps=1))
    metrics = aggregator.finish(model, ServerState())
    assert metrics["comm/upload_bytes"] == metrics["comm/download_bytes"] == 2 * (12 + 3) * 4


def test_fedtiny_server_prunes_k_smallest_and_grows_top_summed_gradients(data):
    from fedmef_core.algorithms import ClientResult
    from fedmef_core.algorithms.fedtiny import TopGradients

    config = _config("fedtiny")
    server = server_of(config, data)
    algorithm, state = server.algorithm, server.state
    old = {k: m.clone() for k, m in state.masks.items()}
    weights = prunable_weights(server.model)
    before = {k: w.detach().clone() for k, w in weights.items()}
    counts = algorithm.move_counts(1, old)
    gen = torch.Generator().manual_seed(0)
    results = []
    for c, n in ((0, 10), (1, 30)):
        idx, val = {}, {}
        for k, m in old.items():
            inactive = (~m.flatten()).nonzero().flatten()
            pick = inactive[torch.randperm(inactive.numel(), generator=gen)[: counts[k]]]
            idx[k], val[k] = pick.to(torch.int32), torch.randn(pick.numel(), generator=gen)
        results.append(ClientResult(client_id=c, num_samples=n, state={}, train_loss=0.0, steps=1,
                                    upload=TopGradients(grad_idx=idx, grad_val=val)))
    sums = algorithm.round_sums(1, server.model, state)  # the streaming aggregation's sums, the weights unchanged
    for r in results:
        algorithm.fold(sums, r)
    metrics = algorithm.adjust_from_sums(1, server.model, sums, state)
    assert metrics["pruned"] == metrics["grown"] == sum(counts.values())
    for k, m in old.items():
        new = state.masks[k]
        pruned = (m & ~new).flatten().nonzero().flatten()
        expect = smallest_active(before[k], m, counts[k])
        assert set(pruned.tolist()) == set(expect.tolist())
        summed = torch.zeros(m.numel(), dtype=torch.float64)
        for r in results:
            summed.index_add_(0, r.upload.grad_idx[k].long(), r.upload.grad_val[k].double() * r.num_samples / 40)
        summed[m.flatten()] = -1  # only previously inactive positions may grow
        grown = (new & ~m).flatten().nonzero().flatten()
        top = torch.sort(summed.abs() * (~m.flatten()), descending=True, stable=True).indices[: counts[k]]
        assert set(grown.tolist()) == set(top.tolist())
        assert torch.all(weights[k][new & ~m] == 0) and torch.all(weights[k][~new] == 0)


def test_nsconv_effective_weights_follow_the_mask(data):
    """Standardization shifts zeros: the mask must reach every NSConv, on clients and on the server."""
    from fedmef_core.models.nsconv import NSConv

    raw = tiny_raw()
    raw["model"] = {"arch": "cnn", "norm": "nsconv"}
    raw["pruning"] = {"method": "fedtiny", "density": 0.2, "adjust_interval": 1, "adjust_until": 2}
    raw["federation"]["rounds"] = 2
    config = parse_config(raw)
    server = server_of(config, data)
    run_rounds(server)
    masks = server.state.masks
    convs = [(n, m) for n, m in server.model.named_modules() if isinstance(m, NSConv)]
    checked = 0
    for name, conv in convs:
        outside = ~masks[f"{name}.weight"].bool()
        if outside.any():  # ERK may keep a small layer (conv1) fully dense
            assert torch.count_nonzero(conv.standardized_weight()[outside]) == 0, name
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("method", ["fedtiny", "fedmef"])
def test_adaptive_bn_selection_keeps_the_candidate_with_the_lowest_weighted_loss(method, data):
    config = _config(method, bn_select=True, bn_candidates=4)
    server = server_of(config, data)
    candidates = [{k: m.clone() for k, m in c.items()} for c in server.state.candidates]
    # candidate 0 is the mask the method starts from without selection (same seed)
    plain = server_of(_config(method), data).state.masks
    assert all(torch.equal(candidates[0][k], plain[k]) for k in plain)
    total = sum(m.numel() for m in plain.values())
    want = round(config.pruning.density * total)
    assert all(sum(int(m.sum()) for m in c.values()) == want for c in candidates)
    assert any(any(int(c[k].sum()) != int(plain[k].sum()) for k in plain) for c in candidates[1:])

    answers = []
    executor = local_executor(server)
    server_metrics = server.setup(lambda b, clients: answers.extend(executor(b, clients)) or answers)

    n = torch.tensor([float(r.num_samples) for r in answers], dtype=torch.float64)
    losses = torch.stack([r.upload.loss for r in answers])
    assert losses.shape == (config.federation.clients_per_round, 4) and torch.all(losses > 0)
    weighted = (losses * n[:, None]).sum(0) / n.sum()
    best = int(torch.argmin(weighted))
    assert server_metrics["bn_select/chosen"] == best
    assert server_metrics[f"bn_select/loss_{best}"] == pytest.approx(float(weighted.min()))
    assert server.state.candidates is None and "candidates" not in server.checkpoint()["server_state"]
    assert all(torch.equal(server.state.masks[k], candidates[best][k]) for k in plain)
    weights = prunable_weights(server.model)
    assert all(torch.all(weights[k][~m] == 0) for k, m in server.state.masks.items())
    # the global BatchNorm statistics are the clients' adapted ones for that candidate, averaged
    name = next(k for k in server.model.state_dict() if k.endswith("running_mean"))
    expect = sum(r.upload.buffers[best][name].double() * r.num_samples for r in answers) / n.sum()
    torch.testing.assert_close(server.model.state_dict()[name].double(), expect, rtol=1e-5, atol=1e-6)
    assert server.setup(executor) == {}  # once only


def test_bn_selection_runs_before_round_one_and_is_reproducible(data):
    config = _config("fedtiny", bn_select=True, bn_candidates=3)
    seen = []
    first = run_rounds(server_of(config, data), on_round=lambda r, m: seen.append(r))
    assert seen == [0, 1, 2]
    again = run_rounds(server_of(config, data))
    assert [h["accuracy"] for h in first] == [h["accuracy"] for h in again]


@pytest.mark.parametrize(("pruning", "model", "needle"), [
    ({"method": "feddst", "bn_select": True}, {}, "needs pruning.method fedtiny or fedmef"),
    ({"method": "fedmef", "bn_select": True}, {"norm": "nsconv"}, "no BatchNorm"),
])
def test_bn_selection_config_errors_name_the_fix(pruning, model, needle):
    from fedmef_core.config import ConfigError

    raw = tiny_raw()
    raw["pruning"], raw["model"] = pruning, model
    with pytest.raises(ConfigError, match=needle) as err:
        parse_config(raw)
    assert "bn_select: false" in str(err.value) and "got {" not in str(err.value)


def _nsconv_config(method, norm="nsconv"):
    config = _config(method, density=0.2, **({"prunefl_reallocate": False} if method == "prunefl" else {}))
    return config.model_copy(update={"model": config.model.model_copy(update={"norm": norm})})


def _grown_channels(method, norm, data):
    """Output channels of conv2 that one server adjustment (round 1) grew weights into, and the count."""
    config = _nsconv_config(method, norm)
    server = server_of(config, data)
    old = server.state.masks["conv2.weight"].clone()
    server.finish_round(1, local_executor(server)(server.broadcast(1), server.sample_clients(1)), 0.0)
    grown = server.state.masks["conv2.weight"] & ~old
    return grown.flatten(1).any(1).sum().item(), int(grown.sum())


@pytest.mark.parametrize("method", ["fedtiny", "prunefl"])
def test_nsconv_growth_spreads_over_output_channels_like_batchnorm(method, data):
    """An NSConv's masked raw weights share one gradient per output channel; growth must rank the
    standardized weight's per-weight gradient, or a stable sort fills the first few channels."""
    ns_channels, ns_grown = _grown_channels(method, "nsconv", data)
    bn_channels, bn_grown = _grown_channels(method, "batch", data)
    assert ns_grown > 100 and bn_grown > 100
    assert ns_channels >= max(0.5 * bn_channels, 16), (ns_channels, bn_channels)


@pytest.mark.parametrize("method", ["fedtiny", "prunefl"])
def test_nsconv_growth_scores_of_inactive_weights_are_distinct(method, data):
    server = server_of(_nsconv_config(method), data)
    result = local_executor(server)(server.broadcast(1), [0])[0]
    inactive = ~server.state.masks["conv2.weight"]
    if method == "prunefl":
        scores = result.upload.grad2["conv2.weight"][inactive]
    else:  # the uploaded top-k gradients of inactive positions
        scores = result.upload.grad_val["conv2.weight"]
    assert scores.numel() > 100
    assert scores.unique().numel() >= 0.99 * scores.numel()


def _feddst_round(data, local_epochs):
    """One FedDST adjustment round by hand: (old masks, client results, server after aggregation)."""
    config = _config("feddst", density=0.2)
    config = config.model_copy(update={"federation": config.federation.model_copy(
        update={"local_epochs": local_epochs, "clients_per_round": 3})})
    server = server_of(config, data)
    old = {k: m.clone() for k, m in server.state.masks.items()}
    results = local_executor(server)(server.broadcast(1), server.sample_clients(1))
    server.finish_round(1, results, 0.0)
    return old, results, server


@pytest.mark.parametrize("local_epochs", [1, 2])
def test_feddst_grown_weights_train_before_upload_and_survive_aggregation(local_epochs, data):
    old, results, server = _feddst_round(data, local_epochs)
    grown_total = nonzero = survived = 0
    for r in results:
        for k, m in r.upload.mask.items():
            grown = m & ~old[k]
            assert int(m.sum()) == int(old[k].sum())  # each client moved exactly k_l
            grown_total += int(grown.sum())
            nonzero += int((r.state[k][grown] != 0).sum())  # they trained after the adjustment
            assert torch.all(r.state[k][~m] == 0)  # the new mask held for the rest of training
            survived += int((grown & server.state.masks[k]).sum())
    assert grown_total > 100
    assert nonzero >= 0.95 * grown_total
    assert survived >= 0.2 * grown_total, (survived, grown_total)  # a meaningful share is kept
    weights = prunable_weights(server.model)
    moved_in = [weights[k][m & ~old[k]] for k, m in server.state.masks.items()]
    moved_in = torch.cat([w.flatten() for w in moved_in])
    assert moved_in.numel() > 100 and torch.all(moved_in != 0)  # the global model's grown weights carry learning
    total = sum(m.numel() for m in old.values())
    assert sum(int(m.sum()) for m in server.state.masks.values()) == round(0.2 * total)


def test_feddst_adjusts_after_half_the_local_epochs(data):
    """With local_epochs >= 2 the mask changes once, right after epoch E // 2 (else after half the steps)."""
    from fedmef_core.algorithms.feddst import FedDST, adjust_step

    config = _config("feddst", density=0.2)
    algorithm = FedDST(config.model_copy(update={"federation": config.federation.model_copy(
        update={"local_epochs": 3})}))
    assert adjust_step(3, 30) == 10
    assert adjust_step(1, 9) == 4 and adjust_step(1, 1) == 1
    server = server_of(config, data)
    payload = server.algorithm.round_payload(1, server.model, server.state)
    seen = []

    def watch(client):
        original = client.step_end

        def step_end(steps_done, total, batches):
            before = client.masks
            original(steps_done, total, batches)
            if client.masks is not before:
                seen.append((steps_done, total))

        client.step_end = step_end

    _client_rounds(algorithm, watch)
    model = type(server.model)(1, 10, 28, lambda c: torch.nn.BatchNorm2d(c))
    model.load_state_dict(server.model.state_dict())
    _train(algorithm.config, data, model, algorithm, payload, check_steps=False)
    assert len(seen) == 1 and seen[0][0] == seen[0][1] // 3


def _baeserver_of(data, **pruning):
    """FedMef without SAP, adjusting in round 2 only (round 1 is a normal round)."""
    config = _config("fedmef", adjust_interval=2, adjust_until=4, **pruning)
    return server_of(config.model_copy(update={"sap": config.sap.model_copy(update={"enabled": False})}), data)


def test_bae_norms_are_reported_on_adjustment_rounds_and_extrusion_shrinks_them(data):
    server = _baeserver_of(data, bae_lambda=1.0)
    history = run_rounds(server)
    normal, adjusted = history
    assert adjusted.get("adjusted") and not normal.get("adjusted")
    keys = ("bae/low_norm_start", "bae/low_norm_end", "bae/low_norm_global", "prune_drop")
    assert not any(k in normal for k in keys) and all(k in adjusted for k in keys)
    assert adjusted["bae/low_norm_end"] < 0.5 * adjusted["bae/low_norm_start"]  # extrusion works
    assert 0 <= adjusted["bae/low_norm_global"] <= adjusted["bae/low_norm_start"]
    assert set(server.checkpoint()["server_state"]) == {"masks"}  # nothing transient is checkpointed


def test_bae_default_extrudes_the_marked_weights_within_the_adjustment_round(data):
    """At the default lambda the extrusion beats the task gradient: the marked weights shrink (at the
    paper's 0.01 they grew, x1.3 here)."""
    server = _baeserver_of(data)  # the config's BaE defaults
    adjusted = run_rounds(server)[1]
    assert adjusted["bae/low_norm_end"] < 0.6 * adjusted["bae/low_norm_start"]


def test_bae_start_norm_is_the_global_models_and_the_mean_is_sample_weighted(data):
    server = _baeserver_of(data)
    server.finish_round(1, local_executor(server)(server.broadcast(1), server.sample_clients(1)), 0.0)
    payload = server.algorithm.round_payload(2, server.model, server.state)
    start = _low_norm(server.model, payload)
    results = local_executor(server)(server.broadcast(2), server.sample_clients(2))
    assert all(r.upload.low_norm_start == pytest.approx(start, rel=1e-6) for r in results)
    n = sum(r.num_samples for r in results)
    end = sum(r.upload.low_norm_end * r.num_samples for r in results) / n
    metrics = server.finish_round(2, results, 0.0)
    assert metrics["bae/low_norm_end"] == pytest.approx(end)


@pytest.mark.parametrize("method", ["fedtiny", "fedmef", "prunefl", "feddst", "fedavg_static"])
def test_prune_drop_is_the_accuracy_of_the_averaged_model_minus_the_pruned_one(method, data):
    """Measured only where the server prunes the averaged model (FedTiny, FedMef, PruneFL)."""
    import copy

    from fedmef_core.aggregation import weighted_average
    from fedmef_core.evaluation import evaluate

    config = _config(method)
    server = server_of(config, data)
    results = local_executor(server)(server.broadcast(1), server.sample_clients(1))
    averaged = copy.deepcopy(server.model)
    ordered = sorted(results, key=lambda r: r.client_id)
    mean = weighted_average([r.state for r in ordered], [r.num_samples for r in ordered])
    server.algorithm.load_average(averaged, mean, server.state.masks)
    before = evaluate(averaged, server.test, server.device).accuracy
    metrics = server.finish_round(1, results, 0.0)
    if method in ("fedavg_static", "feddst"):
        assert "prune_drop" not in metrics
        return
    after = evaluate(server.model, server.test, server.device).accuracy
    assert metrics["accuracy"] == after
    assert metrics["prune_drop"] == before - after
    assert any(not torch.equal(a, b) for a, b in zip(averaged.state_dict().values(),
                                                     server.model.state_dict().values()))  # it did prune
