"""Command-line entry shared by every flow: `python -m flows.<name> [--params FILE] [--set k=v ...]`, also
`fedmef <name> ...` (`flows.command`).

User mistakes (bad config, missing dataset, missing partition or checkpoint) print one message and
exit with status 2 — no traceback, nothing written. Ctrl-C (SIGINT), SIGTERM, SIGHUP and SIGQUIT stop the
flow with "interrupted: the last checkpoint is kept" and exit 128 + the signal's number, e.g. 130 for Ctrl-C
(see `flows.lifecycle`).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

from fedmef_core.config import ExperimentConfig, checked, load_config, parse_override
from fedmef_core.errors import UserError
from flows.lifecycle import detach_temporary_server, exit_code, signals_interrupt

Options = dict[str, dict[str, Any]]  # a flow's own flags: "--flag" -> argparse keywords, `dest` its parameter


def finite_number(text: str) -> float:
    """A command-line number that is finite: `nan` and `inf` mean no setting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def config_parser(description: str, prog: str | None = None, options: Options | None = None
                  ) -> argparse.ArgumentParser:
    """A parser with the config's two options, `--params FILE` and `--set SECTION.KEY=VALUE` (repeatable), and a
    flow's own `options`; `prog` names the command in its help (`fedmef train`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--params", default="params.yaml", help="experiment config (default: params.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one value of the config, e.g. --set federation.rounds=5 (repeatable)",
    )
    for flag, keywords in (options or {}).items():
        parser.add_argument(flag, **keywords)
    return parser


def config_from(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config that parsed `--params` and `--set` options name."""
    return load_config(args.params, dict(parse_override(s) for s in args.set))


def parse_args(argv: list[str] | None, description: str, options: Options | None = None, prog: str | None = None
               ) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The config (`--params`, `--set`) and the values of a flow's own `options`, by parameter name."""
    args = config_parser(description, prog, options).parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in ("params", "set")}
    return config_from(args), extra


def config_from_args(argv: list[str] | None, description: str, prog: str | None = None) -> ExperimentConfig:
    """`--params` and `--set` of every flow's command line."""
    return parse_args(argv, description, prog=prog)[0]


def main(
    flow: Callable[..., Any],
    preflight: Callable[..., None],
    argv: list[str] | None = None,
    prog: str | None = None,
    options: Options | None = None,
) -> Any:
    """Validate the config, check the flow's inputs, run `flow`; user errors become one clear line. The values
    of `options` (a flow's own flags) go to `preflight` and `flow` as keyword arguments."""
    from prefect.exceptions import TerminationSignal

    try:
        config, extra = parse_args(argv, getattr(flow, "description", None) or flow.__doc__ or "", options, prog)
        preflight(config, **extra)
        detach_temporary_server()
        with signals_interrupt():
            return flow(config, **extra)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, TerminationSignal) as exc:
        print("interrupted: the last checkpoint is kept", file=sys.stderr)
        sys.exit(exit_code(exc))


class OneLineUserErrors(logging.Filter):
    """Prefect logs a failed run's exception with its traceback: a task's failure, and (Prefect 3.8's engine,
    for every run a deployment starts) "Engine execution exited with unexpected exception" for the exception
    the flow's Failed state carries. A user error's message is the whole story: its records lose the traceback,
    and those of one :func:`fails_cleanly` has already reported are dropped. A logging filter, as Prefect's
    logging config offers; other exceptions keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, UserError):
            return True
        if getattr(exc, REPORTED, False):
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


ONE_LINE = OneLineUserErrors()
REPORTED = "fedmef_reported"  # set on a user error fails_cleanly has logged
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # what a flow run's logs in the UI come from


def fails_cleanly(body: Callable[..., Any]) -> Callable[..., Any]:
    """A flow body whose config (an experiment's; a sweep's request is validated whole where it is built) is
    checked first (rules across fields: parameters from the UI or the API reach a flow without them) and whose
    user errors end the run as Failed with their one-line message — no traceback in the run's logs
    (:class:`OneLineUserErrors`), its tasks' included. Callers still get the exception: the Failed state carries
    it."""

    @functools.wraps(body)
    def run(config: Any, *args: Any, **kwargs: Any) -> Any:
        from prefect.states import Failed

        for name in RUN_LOGGERS:
            logging.getLogger(name).addFilter(ONE_LINE)  # once: a filter already there is not added again
        try:
            return body(checked(config) if isinstance(config, ExperimentConfig) else config, *args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}")
            setattr(exc, REPORTED, True)
            return Failed(message=str(exc), data=exc)

    run.__signature__ = inspect.signature(body, eval_str=True)  # types resolved where the body is written
    return run
