import pytest
import torch

from fedmef_core.aggregation import weighted_average


def test_weighted_average_is_the_exact_weighted_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(5)]
    weights = [10, 600, 37, 1, 250]
    out = weighted_average(states, weights)
    for key in ("w", "b"):
        expected = sum(w * s[key].double() for s, w in zip(states, weights)) / sum(weights)
        torch.testing.assert_close(out[key], expected.float(), rtol=0, atol=1e-7)
        assert out[key].dtype == torch.float32


def test_equal_weights_give_the_plain_mean_and_integer_buffers_take_the_max():
    states = [
        {"x": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)},
        {"x": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)},
    ]
    out = weighted_average(states, [1, 1])
    assert out["x"].tolist() == [2.0, 4.0]
    assert int(out["n"]) == 9


def test_rejects_empty_or_mismatched_inputs():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"x": torch.zeros(1)}], [1, 2])
    with pytest.raises(ValueError):
        weighted_average([{"x": torch.zeros(1)}], [0])
