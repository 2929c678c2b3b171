"""Round progress: a line per round on a terminal, a progress artifact in the Prefect UI.

Off a terminal (CI, `dvc repro > log`) the per-round lines are left out, but for a round in which no client
trained (every sampled device excluded or over its budget), whose line says so; the flow's start and end
messages and the Prefect UI's progress artifact still tell where a run is. The artifact is updated at most
every `ARTIFACT_EVERY_S` seconds (and at the last round): each update is a call to the Prefect API.
"""

from __future__ import annotations

import sys
import time
from uuid import UUID

ARTIFACT_EVERY_S = 2.0


def _eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _in_flow_run() -> bool:
    try:
        from prefect.context import FlowRunContext

        return FlowRunContext.get() is not None
    except ImportError:
        return False


class RoundProgress:
    """Call `update(round, metrics)` after each round of a run that starts at `first_round`."""

    def __init__(self, total: int, first_round: int = 1, *, stream=None, clock=time.monotonic):
        self.total, self.first_round, self.clock = total, first_round, clock
        self.stream = stream if stream is not None else sys.__stderr__
        self.started = time.perf_counter()
        self._artifact: UUID | None = None
        self._artifact_at = float("-inf")
        if _in_flow_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(
                progress=100.0 * (first_round - 1) / total, key="training-progress",
                description=f"rounds done of {total}",
            )

    @property
    def on_terminal(self) -> bool:
        return bool(self.stream) and self.stream.isatty()

    def line(self, rnd: int, metrics: dict[str, float]) -> str:
        done = rnd - self.first_round + 1
        eta = (time.perf_counter() - self.started) / done * (self.total - rnd)
        acc = f"acc {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  " if "accuracy" in metrics else ""
        trained = (f"train_loss {metrics['train_loss']:.4f}" if "train_loss" in metrics else
                   "no client trained (all sampled excluded or over budget: the model is unchanged)")
        return (
            f"round {rnd:>4}/{self.total} [{100 * rnd / self.total:5.1f}%]  {acc}"
            f"{trained}  {metrics['round_seconds']:.1f}s  ETA {_eta(eta)}"
        )

    def update(self, rnd: int, metrics: dict[str, float]) -> None:
        if self.on_terminal or "train_loss" not in metrics:  # a round in which no client trained: said anywhere
            print(self.line(rnd, metrics), file=self.stream, flush=True)
        now = self.clock()
        if self._artifact is not None and (now - self._artifact_at >= ARTIFACT_EVERY_S or rnd == self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=100.0 * rnd / self.total)
            self._artifact_at = now
