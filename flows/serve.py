"""Serve the flows as deployments the Prefect UI can trigger: `python -m flows.serve` (or `make serve`).

Start a server first (`prefect server start`), point this process at it (`PREFECT_API_URL`), then
open the UI: each deployment (`flows.deployments`) shows the ExperimentConfig as a validated form whose
defaults come from `params.yaml` (the `sweep` deployment shows its grid instead: methods, densities, seeds,
reference and overrides, on top of `params.yaml`). An invalid value is refused by the server before any run starts.
The flow runs execute in this process's machine, in its working directory; `flows.deploy` puts the same
deployments in a work pool for workers on other machines.
"""

from __future__ import annotations

import signal
from typing import Any

from prefect import serve
from prefect.runner import Runner

from fedmef_core.config import ExperimentConfig
from flows.cli import main as cli_main
from flows.deployments import deployments
from flows.lifecycle import Interrupted


def _stop_now(runner: Runner, *args: Any) -> None:
    """SIGTERM stops serving at once. (Prefect's own handler waits for the runner's event loop, which is
    busy in this very thread: `kill` took over a minute.)"""
    raise Interrupted(signal.SIGTERM)


def serve_deployments(config: ExperimentConfig) -> None:
    """Serve the pipeline, partition, train, evaluate and sweep deployments until interrupted (Ctrl-C or
    SIGTERM)."""
    Runner.handle_sigterm = _stop_now  # the runner installs it as its SIGTERM handler when it starts
    serve(*deployments(config))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`--params` (and `--set`) give the form's defaults; a bad config is one clear error, as for every flow."""
    cli_main(serve_deployments, preflight=lambda config: None, argv=argv, prog=prog)


if __name__ == "__main__":
    main()
