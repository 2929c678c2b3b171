"""The global model before round 1: what the server starts from and what the planner traces."""

from __future__ import annotations

import torch

from fedmef_core.algorithms import FederatedAlgorithm, build_algorithm
from fedmef_core.algorithms.records import ServerState
from fedmef_core.config import ExperimentConfig
from fedmef_core.models import GLOBAL_RNG, build_model


def initial_model(config: ExperimentConfig, shape: tuple[int, int, int]) -> tuple[torch.nn.Module, FederatedAlgorithm,
                                                                             ServerState]:
    """The global model before round 1 for images of ``shape`` (channels, size, classes), seeded by
    ``federation.seed``, with its algorithm and server state, bound."""
    seed = config.federation.seed
    channels, size, classes = shape
    with GLOBAL_RNG:  # seeded and drawn in one turn, whatever other threads build meanwhile
        torch.manual_seed(seed)
        model = build_model(config.model, channels, classes, size)
    algorithm = build_algorithm(config)
    state = algorithm.init_server_state(model, torch.Generator().manual_seed(seed))
    algorithm.bind_state(model, state)
    return model, algorithm, state
