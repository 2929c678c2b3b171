"""Federated methods, one module each, chosen by `pruning.method` among the entries of
`fedmef_core.registry.METHODS` (a new method: its module here plus one entry there)."""

from __future__ import annotations

from fedmef_core.algorithms.base import ClientResult, FederatedAlgorithm, MethodTraits
from fedmef_core.algorithms.static import MaskedAlgorithm
from fedmef_core.config import ExperimentConfig
from fedmef_core.registry import METHODS, register_method


def build_algorithm(config: ExperimentConfig) -> FederatedAlgorithm:
    return METHODS[config.pruning.method].load()(config)  # an unknown name: one ValueError naming them all


__all__ = [
    "ClientResult",
    "FederatedAlgorithm",
    "MaskedAlgorithm",
    "MethodTraits",
    "build_algorithm",
    "register_method",
]
