"""The compiled SAP kernels save byte for byte what the NumPy/torch path saves, and restore it exactly."""

import pytest
import torch

from fedmef_core import sap, sap_kernels
from fedmef_core.config import SapConfig


def _reference_pack(x: torch.Tensor, cfg: SapConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """What the NumPy/torch path saves: kept values in flat order and a bitmap (or int32 positions)."""
    keep = sap.keep_mask(x, cfg.gamma)
    idx = sap.true_positions(keep)
    values = x.reshape(-1).index_select(0, idx).to(sap.DTYPES[cfg.value_dtype])
    return values, sap.pack_bits(keep) if cfg.positions == "bitmap" else idx.to(torch.int32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("numel", [5, 37, 1000, 40_000, 300_001])
@pytest.mark.parametrize("kind", ["gaussian", "relu"])
def test_compiled_pack_and_unpack_equal_the_numpy_path(threads, numel, kind, monkeypatch):
    monkeypatch.setattr(sap_kernels, "MIN_CHUNK", 64)  # several chunks even for small tensors
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        if kind == "relu":
            x = x.clamp(min=0)
        for gamma in (0.0, 0.5, 0.7):
            for positions in ("bitmap", "index"):
                for value_dtype in ("float16", "float32"):
                    cfg = SapConfig(enabled=True, gamma=gamma, positions=positions, value_dtype=value_dtype)
                    assert sap_kernels.usable(x)
                    values, where = sap._pack(x, cfg)
                    ref_values, ref_where = _reference_pack(x, cfg)
                    assert values.dtype == ref_values.dtype and torch.equal(values, ref_values)
                    assert where.dtype == ref_where.dtype and torch.equal(where, ref_where)
                    restored = sap._unpack(values, where, cfg, x.shape, torch.float32)
                    expected = torch.zeros(numel).index_put_((sap.true_positions(sap.keep_mask(x, gamma)),),
                                                             ref_values.float())
                    assert torch.equal(restored, expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("max_val", [None, 6.0])
@pytest.mark.parametrize("numel", [3, 64, 1001, 200_003])
def test_compiled_relu_equals_clamp_and_numpy_bits_and_masks_the_gradient(max_val, numel, monkeypatch):
    monkeypatch.setattr(sap_kernels, "MIN_CHUNK", 64)
    g = torch.Generator().manual_seed(numel)
    x, grad = torch.randn(numel, generator=g) * 4, torch.randn(numel, generator=g)
    x[::7] = -0.0  # torch's clamp keeps the sign of a zero and lets NaN through: so must the compiled one
    x[1::11] = float("nan")
    live = sap.greater(x, 0.0) if max_val is None else sap.between(x, 0.0, max_val)
    out, packed = sap_kernels.relu(x, max_val)
    expected = x.clamp(0, max_val)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))  # bit for bit
    assert torch.equal(packed, sap.pack_bits(live))
    if numel % 8 == 0:  # channels_last: the same layout as torch's clamp, the bits in flat (logical) order
        x4 = x.view(numel // 8, 2, 2, 2).contiguous(memory_format=torch.channels_last)
        out4, packed4 = sap_kernels.relu(x4, max_val)
        assert out4.stride() == x4.clamp(0, max_val).stride()
        assert torch.equal(out4.view(torch.int32), x4.clamp(0, max_val).view(torch.int32))
        assert torch.equal(packed4, packed)
    assert torch.equal(sap_kernels.mask_grad(grad, packed), grad * live)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(5, 8, 3, 3), (33, 16, 7, 7), (4, 3, 5, 5), (2, 1, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_relu_and_mask_equal_the_contiguous_ones_bit_for_bit(threads, shape, dtype, monkeypatch):
    """A channels-last activation (read sample by sample; (4, 3, 5, 5) fills no whole bitmap byte per sample
    and goes through an NCHW copy) gives torch's clamp in its own layout, the bits in flat order, and the
    gradient of the contiguous path."""
    monkeypatch.setattr(sap_kernels, "MIN_CHUNK", 64)  # several chunks of whole samples
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(sum(shape))
        x, grad = torch.randn(shape, generator=g, dtype=dtype) * 4, torch.randn(shape, generator=g, dtype=dtype)
        x.view(-1)[::7] = -0.0
        x.view(-1)[1::11] = float("nan")
        x_cl, grad_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
        as_bits = torch.int32 if dtype == torch.float32 else torch.int64
        for max_val in (None, 6.0):
            out, packed = sap_kernels.relu(x, max_val)
            out_cl, packed_cl = sap_kernels.relu(x_cl, max_val)
            assert out_cl.stride() == x_cl.clamp(0, max_val).stride()
            assert torch.equal(out_cl.contiguous().view(as_bits), out.view(as_bits))
            assert torch.equal(packed_cl, packed)
            masked = sap_kernels.mask_grad(grad, packed)
            masked_cl = sap_kernels.mask_grad(grad_cl, packed)
            assert masked_cl.is_contiguous() and torch.equal(masked_cl.view(as_bits), masked.view(as_bits))
    finally:
        torch.set_num_threads(before)


def test_other_dtypes_and_devices_keep_the_numpy_path():
    assert not sap_kernels.usable(torch.zeros(4, dtype=torch.bfloat16))
    assert not sap_kernels.usable(torch.zeros(4, dtype=torch.float16))
    assert sap_kernels.usable(torch.zeros(4)) and sap_kernels.usable(torch.zeros(4, dtype=torch.float64))


def test_a_forked_child_compacts_with_a_pool_of_its_own(monkeypatch):
    """The pool's threads do not survive a fork; a child that used the parent's pool would wait for ever."""
    import os
    import time

    monkeypatch.setattr(sap_kernels, "MIN_CHUNK", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(10_000)
        expected = sap_kernels.relu(x, None)[1]  # the parent's pool now has threads
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the same bits come back
            os._exit(0 if torch.equal(sap_kernels.relu(x, None)[1], expected) else 1)
        deadline = time.monotonic() + 20
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waited for the parent's pool threads")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        torch.set_num_threads(before)
