import math

import pytest
import torch

from fedmef_core.sparse import (
    active_counts,
    apply_masks,
    cosine_alpha,
    erk_densities,
    global_density,
    grow,
    is_adjust_round,
    mask_gradients,
    move_count,
    perturbed_counts,
    prune,
    prune_and_grow,
    random_masks,
    sparse_bytes,
    uniform_densities,
)

SHAPES = {"conv1.weight": (32, 1, 3, 3), "conv2.weight": (64, 32, 3, 3), "fc1.weight": (128, 3136),
          "fc2.weight": (10, 128)}
TOTAL = sum(math.prod(s) for s in SHAPES.values())


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9])
def test_erk_meets_the_global_target_and_caps_layers(density):
    dens = erk_densities(SHAPES, density)
    assert all(0 < d <= 1 for d in dens.values())
    kept = sum(dens[k] * math.prod(s) for k, s in SHAPES.items())
    assert kept == pytest.approx(density * TOTAL, rel=1e-9)
    # uncapped layers keep the ERK ratio sum(dims)/prod(dims)
    raw = {k: sum(s) / math.prod(s) for k, s in SHAPES.items()}
    free = [k for k in SHAPES if dens[k] < 1]
    assert len({round(dens[k] / raw[k], 9) for k in free}) == 1
    assert all(raw[k] >= raw[f] for k in SHAPES if dens[k] == 1 for f in free)
    counts = active_counts(SHAPES, density, "erk")
    assert sum(counts.values()) == round(density * TOTAL)


def test_erk_redistributes_capped_layers():
    dens = erk_densities(SHAPES, 0.2)
    assert dens["conv1.weight"] == 1.0  # tiny layer capped at dense
    assert uniform_densities(SHAPES, 0.3) == dict.fromkeys(SHAPES, 0.3)
    counts = active_counts(SHAPES, 0.3, "uniform")
    assert sum(counts.values()) == round(0.3 * TOTAL)
    with pytest.raises(ValueError, match="density"):
        erk_densities(SHAPES, 0.0)


def test_random_masks_are_seeded_and_exact():
    counts = active_counts(SHAPES, 0.1, "erk")
    a = random_masks(SHAPES, counts, torch.Generator().manual_seed(5))
    b = random_masks(SHAPES, counts, torch.Generator().manual_seed(5))
    c = random_masks(SHAPES, counts, torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert not all(torch.equal(a[k], c[k]) for k in SHAPES)
    assert {k: int(m.sum()) for k, m in a.items()} == counts
    assert global_density(a) == round(0.1 * TOTAL) / TOTAL


def test_apply_and_mask_gradients_zero_outside_the_mask():
    w = torch.nn.Parameter(torch.randn(6, 5))
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    (w * torch.randn(6, 5)).sum().backward()
    mask_gradients({"w": w}, {"w": mask})
    apply_masks({"w": w}, {"w": mask})
    assert torch.all(w[~mask] == 0) and torch.all(w.grad[~mask] == 0)
    assert torch.all(w[mask] != 0)


def test_prune_removes_exactly_the_k_smallest_active():
    w = torch.tensor([0.5, -0.1, 0.0, 2.0, -0.3, 0.05, 1.0, 0.2])
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    new, idx = prune(w, mask, 2)
    assert sorted(idx.tolist()) == [1, 7]  # |-0.1|, |0.2|; inactive 0.05 is not a candidate
    assert int(new.sum()) == int(mask.sum()) - 2
    assert torch.equal(new, mask & ~torch.isin(torch.arange(8), idx))


def test_grow_activates_exactly_the_top_k_inactive():
    mask = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    scores = torch.tensor([9.0, 0.1, 3.0, 8.0, 2.0, 5.0])
    new, idx = grow(scores, mask, 2)
    assert sorted(idx.tolist()) == [2, 5]
    assert torch.equal(new, torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool))


def test_prune_and_grow_keeps_the_count_and_zeroes_new_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 10, generator=g)
    mask = torch.rand(20, 10, generator=g) < 0.3
    w *= mask
    scores = torch.rand(20, 10, generator=g)
    before = w.clone()
    new, p, gr = prune_and_grow(w, mask, scores, 7)
    assert p == gr == 7 and int(new.sum()) == int(mask.sum())
    grown = new & ~mask
    assert int(grown.sum()) == 7 and torch.all(w[grown] == 0)
    assert torch.all(w[~new] == 0)
    assert torch.equal(w[new & mask], before[new & mask])  # survivors untouched
    cand = scores.clone()
    cand[mask] = -1
    assert set(grown.flatten().nonzero().flatten().tolist()) == set(cand.flatten().topk(7).indices.tolist())


def test_schedule():
    assert cosine_alpha(0.2, 0, 300) == pytest.approx(0.2)
    assert cosine_alpha(0.2, 150, 300) == pytest.approx(0.1)
    assert cosine_alpha(0.2, 300, 300) == pytest.approx(0.0)
    assert [r for r in range(1, 40) if is_adjust_round(r, 10, 25)] == [10, 20]
    assert move_count(0.1, 1000) == 100 and move_count(0.5, 10, numel=12) == 2
    assert move_count(0.9, 1) == 0


def test_sparse_bytes_takes_the_cheaper_index():
    assert sparse_bytes(10, 1000) == 40 + 40
    assert sparse_bytes(500, 1000) == 2000 + 125


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_perturbed_counts_keep_the_global_density_and_vary_the_layers(distribution):
    shapes = {"conv1": (16, 1, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3), "fc": (10, 1024)}
    base = active_counts(shapes, 0.1, distribution)
    g = torch.Generator().manual_seed(0)
    draws = [perturbed_counts(shapes, 0.1, distribution, g) for _ in range(5)]
    for counts in draws:
        assert sum(counts.values()) == sum(base.values())
        assert all(1 <= counts[k] <= math.prod(s) for k, s in shapes.items())
    assert any(counts != base for counts in draws)
    assert len({tuple(c.values()) for c in draws}) > 1
