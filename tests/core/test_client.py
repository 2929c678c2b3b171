"""Local training's micro-batches (`federation.micro_batch`): the same step as the whole batch."""

from __future__ import annotations

import torch

from fedmef_core.algorithms.records import RoundPayload
from fedmef_core.client import local_train
from fedmef_core.config import parse_config
from fedmef_core.data import image_shape, load_dataset
from fedmef_core.initial import initial_model
from fedmef_core.tiny import tiny_raw

CPU = torch.device("cpu")


def _train(norm: str, micro_batch: int | None):
    raw = tiny_raw()
    raw["model"] = {"norm": norm}
    raw["federation"].update(batch_size=32, micro_batch=micro_batch, local_epochs=1)
    config = parse_config(raw)
    train, _ = load_dataset(config.data)
    model, algorithm, _ = initial_model(config, image_shape(config.data))
    return local_train(model, train, torch.arange(100), config=config, algorithm=algorithm, payload=RoundPayload(),
                       lr=0.05, generator=torch.Generator().manual_seed(0), device=CPU)


def test_micro_batches_give_the_whole_batchs_step():
    """Without batch statistics (NSConv) the gradients of 4 micro-batches of 8 add up to the batch of 32's: the
    same steps and weights, up to float summation order."""
    whole, split = _train("nsconv", None), _train("nsconv", 8)
    assert split.steps == whole.steps == 4  # 100 samples at batch 32
    assert abs(split.train_loss - whole.train_loss) < 1e-5
    for key, value in whole.state.items():
        torch.testing.assert_close(split.state[key], value, rtol=1e-4, atol=1e-6)


def test_a_micro_batch_not_smaller_than_the_batch_changes_nothing_bit_for_bit():
    whole, same = _train("batch", None), _train("batch", 32)
    assert all(torch.equal(same.state[k], v) for k, v in whole.state.items())
