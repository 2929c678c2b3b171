"""iterate_batches: exact epochs, determinism from the caller's generator only, normalisation, augmentation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from fedmef_core.data import ImageData, iterate_batches
from fedmef_core.data.batches import CROP_PADDING, random_crop_flip


def make_data(n: int = 103, channels: int = 3, size: int = 8) -> ImageData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n, dtype=torch.int64)  # label = index, so batches reveal which samples they hold
    mean, std = (0.1, 0.5, 0.9)[:channels], (0.2, 0.3, 0.4)[:channels]
    return ImageData(images, labels, n, tuple(map(str, range(n))), mean, std)


def epoch(data, indices, batch_size=10, seed=None, **kw):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return list(iterate_batches(data, indices, batch_size, generator=gen, **kw))


def order(batches) -> list[int]:
    return torch.cat([y for _, y in batches]).tolist()


@pytest.mark.parametrize("batch_size", [1, 7, 10, 64, 500])
def test_every_index_once_per_epoch(batch_size):
    data = make_data()
    indices = np.arange(3, 100, 2)  # a client's shard, as partition_indices returns it
    batches = epoch(data, indices, batch_size, seed=0, shuffle=True)
    assert sorted(order(batches)) == indices.tolist()
    assert all(len(y) == batch_size for _, y in batches[:-1]) and 0 < len(batches[-1][1]) <= batch_size


def test_drop_last_and_plain_order():
    data = make_data()
    assert order(epoch(data, range(25), 10)) == list(range(25))  # no shuffle: given order, generator unused
    batches = epoch(data, range(25), 10, drop_last=True)
    assert [len(y) for _, y in batches] == [10, 10]
    assert epoch(data, [], 10) == []
    assert order(epoch(data, torch.tensor([5, 1, 9]), 2)) == [5, 1, 9]


def test_shuffle_is_deterministic_per_seed_and_leaves_global_rng_alone():
    data = make_data()
    state = torch.get_rng_state()
    first = order(epoch(data, range(103), 16, seed=1, shuffle=True))
    assert torch.equal(torch.get_rng_state(), state)
    assert first == order(epoch(data, range(103), 16, seed=1, shuffle=True))
    assert first != order(epoch(data, range(103), 16, seed=2, shuffle=True))
    assert first != list(range(103))
    gen = torch.Generator().manual_seed(1)  # one generator across epochs: a new order each epoch
    e1 = order(iterate_batches(data, range(103), 16, generator=gen, shuffle=True))
    e2 = order(iterate_batches(data, range(103), 16, generator=gen, shuffle=True))
    assert e1 == first and e2 != e1


def test_randomness_without_generator_is_refused():
    with pytest.raises(ValueError, match="Generator"):
        next(iterate_batches(make_data(), range(10), 4, shuffle=True))
    with pytest.raises(ValueError, match="Generator"):
        next(iterate_batches(make_data(), range(10), 4, augment=True))


def test_normalisation():
    data = make_data()
    (x, y), *_ = epoch(data, [4, 7, 2], 3)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 3, 8, 8)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    expected = (data.images[[4, 7, 2]].double() / 255 - mean.double()) / std.double()
    assert torch.allclose(x.double(), expected, atol=1e-6)
    assert y.tolist() == [4, 7, 2]


def test_augmentation_keeps_shape_and_is_deterministic_per_seed():
    data = make_data(channels=1)
    plain = torch.cat([x for x, _ in epoch(data, range(103), 32)])
    a = torch.cat([x for x, _ in epoch(data, range(103), 32, seed=5, augment=True)])
    b = torch.cat([x for x, _ in epoch(data, range(103), 32, seed=5, augment=True)])
    c = torch.cat([x for x, _ in epoch(data, range(103), 32, seed=6, augment=True)])
    assert a.shape == plain.shape == (103, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    pixels = (a * data.std[0] + data.mean[0]) * 255  # undo the normalisation: whole pixel values again
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert (pixels.round() == 0).sum() > (data.images == 0).sum()  # the zero padding shows up


def test_vectorised_crop_flip_equals_torchvision_per_sample():
    images = make_data(n=40).images
    out = random_crop_flip(images, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the same draws, in the documented order
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (40, 2), generator=g)
    flips = torch.rand(40, generator=g) < 0.5
    assert 5 < int(flips.sum()) < 35
    for i in range(40):
        ref = F.crop(F.pad(images[i], [CROP_PADDING], fill=0), int(offsets[i, 0]), int(offsets[i, 1]), 8, 8)
        if flips[i]:
            ref = F.horizontal_flip(ref)
        assert torch.equal(out[i], ref), i


def test_threads_with_own_generators_match_sequential_runs():
    data = make_data()
    expected = {s: order(epoch(data, range(103), 8, seed=s, shuffle=True, augment=True)) for s in range(4)}
    results: dict[int, list[int]] = {}

    def run(seed):
        results[seed] = order(epoch(data, range(103), 8, seed=seed, shuffle=True, augment=True))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batches_on_cuda_match_cpu():
    data = make_data()
    cpu = epoch(data, range(103), 16, seed=3, shuffle=True, augment=True)
    gpu = epoch(data, range(103), 16, seed=3, shuffle=True, augment=True, device="cuda")
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-6)
