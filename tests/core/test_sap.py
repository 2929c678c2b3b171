import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core import sap as sap_module
from fedmef_core.config import SapConfig, parse_config
from fedmef_core.engine import run_rounds
from fedmef_core.sap import (
    SAMPLE,
    apply_sap,
    at_least,
    between,
    conv2d,
    count_true,
    greater,
    keep_mask,
    kth_largest,
    linear,
    masked,
    pack_bits,
    relu_bitmask,
    resolve_sap,
    true_positions,
    unpack_bits,
)
from tests.conftest import server_of, tiny_raw

CONV_CASES = [  # (in, out, kernel, stride, padding, groups, bias)
    (3, 8, 3, 1, 1, 1, False),
    (4, 6, 3, 2, 1, 2, True),
    (6, 6, 3, 1, 1, 6, False),  # depthwise
    (5, 7, 1, 1, 0, 1, True),
]


def _conv_grads(fn, x, w, b, grad_out):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    out = fn(x, w, b)
    out.backward(grad_out)
    return out.detach(), x.grad, w.grad, None if b is None else b.grad


def _case(cin, cout, k, stride, padding, groups, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, cin, 9, 9, generator=g)
    w = torch.randn(cout, cin // groups, k, k, generator=g)
    b = torch.randn(cout, generator=g) if bias else None
    out_hw = (9 + 2 * padding - k) // stride + 1
    grad_out = torch.randn(4, cout, out_hw, out_hw, generator=g)
    return x, w, b, grad_out


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("positions", ["index", "bitmap"])
def test_gamma_zero_fp32_conv_matches_plain_conv(case, positions):
    cin, cout, k, stride, padding, groups, bias = case
    x, w, b, grad_out = _case(*case)
    sap = SapConfig(gamma=0.0, value_dtype="float32", positions=positions)
    ref = _conv_grads(lambda x, w, b: F.conv2d(x, w, b, stride, padding, 1, groups), x, w, b, grad_out)
    got = _conv_grads(
        lambda x, w, b: conv2d(x, w, b, (stride, stride), (padding, padding), (1, 1), groups, sap),
        x, w, b, grad_out,
    )
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("case", CONV_CASES[:2])
def test_conv_input_grad_exact_weight_grad_from_sparsified_input(case, gamma):
    cin, cout, k, stride, padding, groups, bias = case
    x, w, b, grad_out = _case(*case, seed=1)
    # the reference sparsification, written independently: keep the top n - floor(gamma n) magnitudes
    n = x.numel()
    kept = torch.topk(x.abs().reshape(-1), n - math.floor(gamma * n)).indices
    x_sparse = torch.zeros(n).index_copy_(0, kept, x.reshape(-1)[kept]).view_as(x)

    def plain(x, w, b):
        return F.conv2d(x, w, b, stride, padding, 1, groups)

    dense = _conv_grads(plain, x, w, b, grad_out)
    from_sparse = _conv_grads(plain, x_sparse, w, b, grad_out)
    results = {}
    for positions in ("index", "bitmap"):
        sap = SapConfig(gamma=gamma, value_dtype="float32", positions=positions)
        results[positions] = got = _conv_grads(
            lambda x, w, b, sap=sap: conv2d(x, w, b, (stride, stride), (padding, padding), (1, 1), groups, sap),
            x, w, b, grad_out,
        )
        torch.testing.assert_close(got[0], dense[0])  # forward uses the full input
        torch.testing.assert_close(got[1], dense[1], rtol=1e-5, atol=1e-5)  # input grad exact
        torch.testing.assert_close(got[2], from_sparse[2], rtol=1e-5, atol=1e-5)  # weight grad
        assert not torch.allclose(got[2], dense[2])  # ... which really differs from the dense one
    for a, c in zip(results["index"], results["bitmap"]):
        assert (a is None and c is None) or torch.equal(a, c)  # bitmap and index: identical


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_low_precision_values_give_weight_grad_of_rounded_sparse_input(value_dtype):
    x, w, b, grad_out = _case(3, 8, 3, 1, 1, 1, True, seed=2)
    sap = SapConfig(gamma=0.5, value_dtype=value_dtype)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[value_dtype]
    x_ref = (x.reshape(-1) * keep_mask(x, 0.5)).to(dtype).float().view_as(x)
    got = _conv_grads(lambda x, w, b: conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, sap), x, w, b, grad_out)
    ref = _conv_grads(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x_ref, w, b, grad_out)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[3], ref[3])


@pytest.mark.parametrize("gamma", [0.0, 0.6])
def test_linear_matches_reference(gamma):
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(6, 2, 10, generator=g), torch.randn(5, 10, generator=g), torch.randn(5, generator=g)
    grad_out = torch.randn(6, 2, 5, generator=g)
    x_sparse = (x.reshape(-1) * keep_mask(x, gamma)).view_as(x)
    ref = _conv_grads(F.linear, x, w, b, grad_out)
    ref_sparse = _conv_grads(F.linear, x_sparse, w, b, grad_out)
    for positions in ("index", "bitmap"):
        sap = SapConfig(gamma=gamma, value_dtype="float32", positions=positions)
        got = _conv_grads(lambda x, w, b, sap=sap: linear(x, w, b, sap), x, w, b, grad_out)
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], ref_sparse[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-5)


def test_keep_mask_counts_and_zeros():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    assert int(keep_mask(x, 0.7).sum()) == 300
    relu_out = torch.relu(x)  # about half zeros: with gamma 0.2 only the non-zeros are worth keeping
    kept = keep_mask(relu_out, 0.2)
    assert int(kept.sum()) == int((relu_out > 0).sum())


def _big(kind: str, n: int = 64 * 16 * 14 * 14) -> torch.Tensor:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, generator=g)
    if kind == "relu":  # half zeros, as after a ReLU
        return torch.relu(x)
    if kind == "heavy":  # heavy tails
        return x / torch.rand(n, generator=g).clamp_min(1e-3)
    # channels whose scales span four orders of magnitude: a structured tensor (64, 16, 14, 14)
    return (x.view(64, 16, 196) * torch.logspace(-2, 2, 16).view(1, 16, 1)).reshape(-1)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("kind", ["normal", "relu", "heavy", "channels"])
def test_keep_mask_on_big_tensors_is_a_threshold_keeping_one_minus_gamma_within_one_percent(kind, gamma):
    x = _big(kind)
    n = x.numel()
    assert n > SAMPLE  # the sampled threshold, not the exact selection
    keep = keep_mask(x, gamma)
    mag = x.abs()
    assert mag[keep].min() >= mag[~keep].max()  # every kept entry is at least as large as every dropped one
    k = n - math.floor(gamma * n)
    expected = min(k, int((x != 0).sum()))  # never a zero: with many zeros only the non-zeros are kept
    assert abs(int(keep.sum()) - expected) <= 0.01 * n


def test_keep_mask_selects_exactly_when_the_sample_misses():
    n = 200_000
    x = torch.rand(n, generator=torch.Generator().manual_seed(9))
    x[sap_module._sample_positions(n, x.device)] += 10.0  # every sampled entry is among the largest
    keep = keep_mask(x, 0.5)  # the sample's median keeps only ~16% of the entries: exact selection instead
    assert int(keep.sum()) == n // 2
    assert torch.equal(keep, x >= torch.kthvalue(x, n - n // 2 + 1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bool_kernels_match_torch(dtype):
    """The NumPy fast paths (CPU) give what torch's own operations give; bfloat16 falls back to torch."""
    x = (torch.randn(1001, generator=torch.Generator().manual_seed(10)) * 4).to(dtype)
    assert torch.equal(greater(x, 0.0), x > 0)
    assert torch.equal(at_least(x, 1.5), x >= 1.5)
    assert torch.equal(between(x, 0.0, 6.0), (x > 0) & (x < 6))
    live = x > 0
    assert torch.equal(masked(x, live), x * live)
    assert torch.equal(true_positions(live), live.nonzero().reshape(-1))
    assert count_true(live) == int(live.sum())
    assert torch.equal(pack_bits(live), sap_module._pack_bits_torch(live))  # GPUs store the same bitmap
    assert torch.equal(unpack_bits(pack_bits(live), 1001), live)
    assert torch.equal(sap_module._unpack_bits_torch(pack_bits(live), 1001), live)


def test_pack_bits_round_trip():
    m = torch.rand(37, generator=torch.Generator().manual_seed(5)) > 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(unpack_bits(packed, 37), m)


@pytest.mark.parametrize("max_val", [None, 6.0])
def test_bitmask_relu_matches_relu(max_val):
    x = (torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(6)) * 5).requires_grad_(True)
    grad = torch.randn(3, 4, 5)
    ref_fn = torch.relu if max_val is None else F.relu6
    ref_out = ref_fn(x)
    (ref_grad,) = torch.autograd.grad(ref_out, x, grad)
    out = relu_bitmask(x, max_val)
    (got_grad,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, ref_out) and torch.equal(got_grad, ref_grad)


def test_apply_sap_keeps_state_dict_and_gamma_zero_matches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3), nn.ReLU6())
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    apply_sap(model, SapConfig(gamma=0.0, value_dtype="float32", relu_bitmask=True))
    assert list(model.state_dict()) == keys
    assert type(model[0]).__name__ == "SapConv2d" and isinstance(model[0], nn.Conv2d)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    plain(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain.eval()(x))


def test_sap_auto_enables_for_fedmef_only():
    raw = tiny_raw()
    assert resolve_sap(parse_config(raw)) is None
    raw["pruning"] = {"method": "fedmef"}
    assert resolve_sap(parse_config(raw)) is not None
    raw["sap"] = {"enabled": False}
    assert resolve_sap(parse_config(raw)) is None
    raw = tiny_raw()
    raw["sap"] = {"enabled": True, "gamma": 0.7}
    assert resolve_sap(parse_config(raw)).gamma == 0.7


def _history(config):
    server = server_of(config)
    return [(h["round"], h["accuracy"], h["loss"], h["train_loss"]) for h in run_rounds(server)]


def test_short_training_with_sap_runs_and_is_deterministic(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["data"]["train_limit"] = 600
    raw["federation"].update(rounds=2, clients_per_round=2)
    raw["model"] = {"arch": "cnn", "norm": "nsconv"}
    raw["sap"] = {"enabled": True, "gamma": 0.5, "positions": "bitmap", "relu_bitmask": True}
    config = parse_config(raw)
    first, second = _history(config), _history(config)
    assert first == second
    assert all(math.isfinite(v) for row in first for v in row)
    assert first[-1][3] < first[0][3] or first[-1][1] > 0.2


@pytest.mark.parametrize("k_frac", [0.0, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("size", [40_000, 100_352, 300_000])
def test_kth_largest_is_exact_on_big_tensors(k_frac, size):
    g = torch.Generator().manual_seed(7)
    values = torch.cat([torch.randn(size, generator=g).abs(), torch.zeros(size // 3)])
    n = values.numel()
    for k in {1, max(1, int(k_frac * n)), n - 1}:
        assert kth_largest(values, k) == torch.kthvalue(values, n - k + 1).values
    ties = torch.randint(0, 50, (size,), generator=g).float()  # heavy ties: the bracket logic must hold
    for k in (1, size // 3, size // 2, size - 1):
        assert kth_largest(ties, k) == torch.kthvalue(ties, size - k + 1).values


@pytest.mark.parametrize("norm", ["batch", "nsconv"])
def test_sap_under_autocast_matches_plain_layers_under_autocast(norm):
    """Mixed precision: with nothing dropped, SAP layers give the same gradients as plain ones, fp32 grads."""
    from fedmef_core.config import ModelConfig
    from fedmef_core.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", norm=norm), 1, 10, 28)
    plain = copy.deepcopy(model)
    apply_sap(model, SapConfig(gamma=0.0, value_dtype="float32"))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for net in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3, msg=n)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["fedavg", "fedmef"])
def test_mixed_precision_training_tracks_fp32_and_keeps_fp32_weights(tmp_path, precision, method):
    raw = tiny_raw(tmp_path)
    raw["federation"]["rounds"] = 2
    raw["pruning"] = {"method": method, "adjust_interval": 1, "adjust_until": 2}  # fedmef: SAP and BaE on
    reference = _history(parse_config(raw))
    raw["federation"]["precision"] = precision
    config = parse_config(raw)
    server = server_of(config)
    got = [(h["round"], h["accuracy"], h["loss"], h["train_loss"]) for h in run_rounds(server)]
    assert all(v.dtype in (torch.float32, torch.int64) for v in server.model.state_dict().values())
    assert got != reference  # autocast really ran in lower precision
    for (_, _, loss, train_loss), (_, _, ref_loss, ref_train) in zip(got, reference):
        assert abs(loss - ref_loss) < 0.1 and abs(train_loss - ref_train) < 0.1
    assert abs(got[-1][1] - reference[-1][1]) < 0.05
