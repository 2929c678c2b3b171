"""Federated methods, one module each, chosen by `pruning.method`."""

from __future__ import annotations

from fedmef_core.algorithms.base import ClientResult, FederatedAlgorithm, MethodTraits
from fedmef_core.algorithms.feddst import FedDST
from fedmef_core.algorithms.fedmef import FedMef
from fedmef_core.algorithms.fedtiny import FedTiny
from fedmef_core.algorithms.prunefl import PruneFL
from fedmef_core.algorithms.static import MaskedAlgorithm
from fedmef_core.config import ExperimentConfig

REGISTRY: dict[str, type[FederatedAlgorithm]] = {
    "fedavg": FederatedAlgorithm,
    "fedavg_static": MaskedAlgorithm,
    "prunefl": PruneFL,
    "feddst": FedDST,
    "fedtiny": FedTiny,
    "fedmef": FedMef,
}


def build_algorithm(config: ExperimentConfig) -> FederatedAlgorithm:
    try:
        cls = REGISTRY[config.pruning.method]
    except KeyError:
        raise ValueError(
            f"unknown pruning.method {config.pruning.method!r}; available: {sorted(REGISTRY)}"
        ) from None
    return cls(config)


__all__ = ["REGISTRY", "ClientResult", "FederatedAlgorithm", "MaskedAlgorithm", "MethodTraits", "build_algorithm"]
