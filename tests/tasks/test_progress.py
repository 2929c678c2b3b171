"""Round progress: a line per round on a terminal; the Prefect progress artifact at most every
ARTIFACT_EVERY_S seconds and at the last round (each update is an API call)."""

import io

import prefect.artifacts
from prefect import flow

import tasks.progress as progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_line_per_round_on_a_terminal_and_the_artifact_only_when_due(prefect_harness, monkeypatch):
    updates, real = [], prefect.artifacts.update_progress_artifact
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda artifact, progress: (updates.append(progress), real(artifact, progress=progress)))
    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0, 3.2])  # round 1 at 0 s, 2 at 0.5 s, ... 6 at 3.2 s
    terminal = Terminal()

    @flow
    def rounds():
        bar = progress.RoundProgress(6, stream=terminal, clock=lambda: next(clock))
        for rnd in range(1, 7):
            bar.update(rnd, {"train_loss": 1.0 / rnd, "round_seconds": 0.5})

    rounds()
    assert len(terminal.getvalue().splitlines()) == 6 and "round    6/6 [100.0%]" in terminal.getvalue()
    pct = [round(100 * r / 6, 4) for r in (1, 4, 6)]  # due at 0 s, then at 2.5 s (2 s later), and the last
    assert [round(u, 4) for u in updates] == pct
