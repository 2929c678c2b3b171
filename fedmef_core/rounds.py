"""What the round loop (:func:`fedmef_core.engine.run_rounds`) tells the code around it, and what a training saves.

- :class:`RoundOutcome`: what a round did — its metrics (the history row) and who took part.
- :class:`RoundObserver`: the loop's three moments (the method's setup exchange, each finished round, the end);
  the pipeline's reports and outputs, and the bare loop's checkpoints and callback, are observers.
- :class:`Checkpoints`: the one definition of what a training saves and when, used by both.
- :func:`untrained`: whether no client ever trained; a training in which none did (every sampled device excluded
  or over its budget, round after round) has no trained model: :func:`no_client_trained`, one message for every
  stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmef_core.checkpoint import FINAL_NAME, round_checkpoint_path, save_checkpoint
from fedmef_core.config import ExperimentConfig
from fedmef_core.errors import UserError


@dataclass
class RoundOutcome:
    """A finished round: its ``metrics`` (the row appended to ``Server.history``; it holds ``dropped_clients``
    when the executor drops failing clients) and who took part: the clients asked to ``train``, those whose
    update ``arrived`` (client-id order), how many were ``dropped`` (any fault, over-budget included) and those
    that went ``over_budget``."""

    round: int
    metrics: dict[str, float]
    trained: list[int] = field(default_factory=list)
    arrived: list[int] = field(default_factory=list)
    dropped: int = 0
    over_budget: list[int] = field(default_factory=list)


class NoClientTrained(UserError):
    """No client's update ever reached the model: it is the untrained initial one."""


def untrained(history: list[dict[str, Any]]) -> bool:
    """Whether `history` has rounds and none of them aggregated a client's update (a round whose sampled clients
    were all excluded or over budget has ``clients`` 0 and leaves the model as it was)."""
    return bool(history) and not any(row["clients"] for row in history)


def no_client_trained(config: ExperimentConfig, rounds: int, consequence: str) -> NoClientTrained:
    """The error of a training of `config` in which no client trained in any of its `rounds`; `consequence`:
    what that leaves undone (e.g. "no model is registered")."""
    devices = config.devices
    return NoClientTrained(
        f"no client trained in any of the {rounds} rounds: every sampled client was excluded or over its memory "
        f"budget (devices.profile: {devices.profile}, devices.policy: {devices.policy}), so the model is the "
        f"untrained initial one and {consequence}; give the devices more memory (devices.tiers or devices.trace) "
        "or a policy that fits them (devices.policy: fit_batch, fit_gamma or accumulate, a smaller "
        "devices.min_batch), then train again"
    )


class RoundObserver:
    """Sees a training as the loop runs it; every hook does nothing unless overridden. `server` is the engine's
    ``Server`` (its model, state and history as they stand after the moment)."""

    def setup_done(self, server: Any, metrics: dict[str, float]) -> None:
        """After the method's one-off setup exchange before round 1 (only when it ran: FedTiny's BN selection)."""

    def round_done(self, server: Any, outcome: RoundOutcome) -> None:
        """After each round, outside the round's interruptible part: writes here are never cut in half."""

    def training_done(self, server: Any) -> None:
        """After the last round."""


class Checkpoints(RoundObserver):
    """What a training saves and when — the one schedule, for the pipeline and the bare loop alike: after
    round ``r``, ``round_XXXX.pt`` when ``r`` is a multiple of ``runtime.checkpoint_every`` or the last round; at
    the end ``final.pt``. Each holds ``server.checkpoint(extra())`` (the model, the method's server state, the
    history without timings, the RNG and the config: identical runs write identical files)."""

    def __init__(self, directory: str | Path, every: int, rounds: int,
                 extra: Callable[[], dict[str, Any]] = dict):
        self.directory, self.every, self.rounds, self.extra = Path(directory), every, rounds, extra

    @classmethod
    def of(cls, config: ExperimentConfig, directory: str | Path,
           extra: Callable[[], dict[str, Any]] = dict) -> Checkpoints:
        return cls(directory, config.runtime.checkpoint_every, config.federation.rounds, extra)

    def due(self, rnd: int) -> bool:
        """Whether round `rnd` leaves a checkpoint."""
        return rnd % self.every == 0 or rnd == self.rounds

    def save_round(self, server: Any, rnd: int) -> Path:
        return save_checkpoint(round_checkpoint_path(self.directory, rnd), server.checkpoint(self.extra()))

    def save_final(self, server: Any) -> Path:
        return save_checkpoint(self.directory / FINAL_NAME, server.checkpoint(self.extra()))

    def round_done(self, server: Any, outcome: RoundOutcome) -> None:
        if self.due(outcome.round):
            self.save_round(server, outcome.round)

    def training_done(self, server: Any) -> None:
        self.save_final(server)


class OnRound(RoundObserver):
    """``callback(round, metrics)`` after each round, and ``callback(0, metrics)`` after a setup exchange."""

    def __init__(self, callback: Callable[[int, dict[str, float]], None]):
        self.callback = callback

    def setup_done(self, server: Any, metrics: dict[str, float]) -> None:
        self.callback(0, metrics)

    def round_done(self, server: Any, outcome: RoundOutcome) -> None:
        self.callback(outcome.round, outcome.metrics)
