"""Federated methods, one module each, chosen by `pruning.method` among the entries of
`fedmef_core.registry.METHODS` (a new method: its module here plus one entry there)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from fedmef_core.algorithms.base import ClientResult, FederatedAlgorithm, MethodTraits
from fedmef_core.algorithms.static import MaskedAlgorithm
from fedmef_core.config import ExperimentConfig
from fedmef_core.registry import METHODS, register_method


class _Classes(Mapping[str, type[FederatedAlgorithm]]):
    """Method name -> algorithm class, read live from `METHODS` (a class is imported when first asked for)."""

    def __getitem__(self, name: str) -> type[FederatedAlgorithm]:
        if name not in METHODS:
            raise KeyError(name)
        return METHODS[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)


REGISTRY: Mapping[str, type[FederatedAlgorithm]] = _Classes()


def build_algorithm(config: ExperimentConfig) -> FederatedAlgorithm:
    return METHODS[config.pruning.method].load()(config)  # an unknown name: one ValueError naming them all


__all__ = [
    "REGISTRY",
    "ClientResult",
    "FederatedAlgorithm",
    "MaskedAlgorithm",
    "MethodTraits",
    "build_algorithm",
    "register_method",
]
