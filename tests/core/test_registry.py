"""A method or a dataset is one registry entry: registered from here, without touching `config.py`, it is a valid
choice, resolved by its traits, listed in the form's drop-down and run by the engine."""

from __future__ import annotations

import pytest
import torch

from fedmef_core.algorithms import FederatedAlgorithm, build_algorithm
from fedmef_core.config import ConfigError, ExperimentConfig, parse_config
from fedmef_core.data import ImageData, image_shape, load_dataset
from fedmef_core.engine import run_rounds
from fedmef_core.registry import DATASETS, METHODS, Dataset, MethodTraits, register_dataset, register_method
from tests.conftest import data_of, server_of, tiny_raw


class ToyAverage(FederatedAlgorithm):
    """Dense FedAvg that counts the instances the engine builds."""

    built = 0

    def __init__(self, config):
        super().__init__(config)
        type(self).built += 1


@pytest.fixture
def toy_method():
    register_method("toy", traits=MethodTraits(norm="nsconv"))(ToyAverage)  # the decorator form
    try:
        yield "toy"
    finally:
        METHODS.remove("toy")


def _enum(section: str, field: str) -> list[str]:
    return ExperimentConfig.model_json_schema()["$defs"][section]["properties"][field]["enum"]


def test_a_method_registered_here_is_validated_resolved_listed_and_run(toy_method, data):
    raw = tiny_raw()
    raw["pruning"] = {"method": toy_method, "density": 0.3}
    config = parse_config(raw)
    assert config.model.norm == "nsconv" and config.pruning.density == 1.0  # its traits: NSConv, dense
    assert _enum("PruningConfig", "method")[-1] == toy_method and METHODS[toy_method].load() is ToyAverage
    before = ToyAverage.built
    history = run_rounds(server_of(config, data))
    assert len(history) == config.federation.rounds and ToyAverage.built > before
    assert all(0 < h["accuracy"] <= 1 for h in history)


def test_a_method_no_longer_registered_is_refused_by_name():
    register_method("toy_gone", ToyAverage)
    config = parse_config({"pruning": {"method": "toy_gone"}})
    METHODS.remove("toy_gone")
    assert "toy_gone" not in _enum("PruningConfig", "method")
    with pytest.raises(ConfigError) as err:
        parse_config({"pruning": {"method": "toy_gone"}})
    message = str(err.value)
    assert "pruning.method: Input should be a registered method: 'fedavg', 'fedavg_static'" in message
    assert "'fedtiny' or 'fedmef' (got 'toy_gone')" in message and "Traceback" not in message
    with pytest.raises(ValueError, match="unknown method 'toy_gone'; registered: 'fedavg'"):
        build_algorithm(config)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="method 'fedmef' is registered already"):
        register_method("fedmef", ToyAverage)
    assert METHODS["fedmef"].load().__name__ == "FedMef"  # the built-in entry stays


def _stripes(entry: Dataset, root: str) -> tuple[ImageData, ImageData]:
    """Two classes of 16x16 grey images: horizontal (0) or vertical (1) stripes, with noise."""
    generator = torch.Generator().manual_seed(0)
    splits = []
    for n in (96, 32):
        labels = torch.arange(n, dtype=torch.int64) % 2
        stripes = (torch.arange(entry.size) % 4 < 2).to(torch.uint8) * 200
        images = torch.where(labels.view(n, 1, 1, 1).bool(), stripes.view(1, 1, 1, -1), stripes.view(1, 1, -1, 1))
        noise = torch.randint(0, 40, (n, 1, entry.size, entry.size), generator=generator, dtype=torch.uint8)
        splits.append(ImageData((images + noise).contiguous(), labels, 2, ("horizontal", "vertical"), *entry.stats))
    return splits[0], splits[1]


def test_a_dataset_registered_here_is_validated_listed_loaded_and_trained_on():
    register_dataset("stripes", Dataset(_stripes, channels=1, size=16, classes=2, stats=((0.5,), (0.3,))))
    try:
        raw = tiny_raw()
        raw["data"] = {"name": "stripes"}
        raw["partition"] = {"scheme": "iid", "min_samples": 4}
        raw["federation"].update(num_clients=4, clients_per_round=2, rounds=2)
        config = parse_config(raw)
        assert "stripes" in _enum("DataConfig", "name")
        train, test = load_dataset(config.data)
        assert train.shape == image_shape(config.data) == (1, 16, 2) and len(test) == 32
        history = run_rounds(server_of(config, data_of(config)))
        assert len(history) == 2 and 0 < history[-1]["accuracy"] <= 1
    finally:
        DATASETS.remove("stripes")
    with pytest.raises(ConfigError, match="data.name: Input should be a registered dataset: 'fashion_mnist'"):
        parse_config({"data": {"name": "stripes"}})


def toy_net(in_channels: int, num_classes: int, image_size: int, norm) -> torch.nn.Module:
    """A builder as `registry.ARCHITECTURES` names them: a linear classifier over the flattened image."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size ** 2, num_classes))


def test_an_architecture_registered_here_is_validated_listed_and_built():
    from fedmef_core.models import build_model
    from fedmef_core.registry import ARCHITECTURES, register_architecture

    assert _enum("ModelConfig", "arch") == ["cnn", "resnet8", "resnet18", "mobilenetv2"]  # the form's order
    register_architecture("toy_net", toy_net)
    try:
        config = parse_config({"model": {"arch": "toy_net", "norm": "batch"}})
        assert _enum("ModelConfig", "arch")[-1] == "toy_net"
        model = build_model(config.model, 1, 10, 28)
        assert isinstance(model[1], torch.nn.Linear) and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    finally:
        ARCHITECTURES.remove("toy_net")
    with pytest.raises(ConfigError, match="model.arch: Input should be a registered architecture: 'cnn'"):
        parse_config({"model": {"arch": "toy_net"}})
