"""`fedmef`: one command for every flow — `fedmef <command> [--params FILE] [--set section.key=value ...]`.

Installed by `pip install -e .` (`[project.scripts]`); `python -m flows.command` is the same program, and
`python -m flows.<name>` still runs each flow on its own. Every subcommand is the flow module's own `main`, so
its options, errors (one line, exit status 2) and signals (exit 128 + n) are exactly those of
`python -m flows.<name>`. A new subcommand is one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

# name -> (module whose `main(argv, prog)` runs it, one line of help); imported only when chosen, so `--help`
# and `--version` answer at once
COMMANDS: dict[str, tuple[str, str]] = {
    "partition": ("flows.partition", "split the training set among the clients (data/partitions/)"),
    "train": ("flows.train", "federated training: checkpoints, metrics, plots and the MLflow run"),
    "evaluate": ("flows.evaluate", "test the trained model (metrics/eval.json, confusion matrix)"),
    "pipeline": ("flows.pipeline", "partition, train and evaluate as one Prefect flow run"),
    "sweep": ("flows.sweep", "methods x densities x seeds, compared under one MLflow parent run"),
    "summary": ("flows.summary", "a finished run in a few lines"),
    "serve": ("flows.serve", "serve the deployments that the Prefect UI triggers"),
    "plan": ("flows.plan", "which methods a client with a memory budget can train, at which batch and SAP gamma"),
    "deploy": ("flows.deploy", "deploy every flow into a Prefect work pool that workers on GPU machines serve"),
}


def package_version() -> str:
    try:
        return version("fedmef")
    except PackageNotFoundError:  # imported from a checkout that was never installed
        return "(not installed)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2, as for every user mistake
        self.exit(2, f"error: {message} (fedmef --help lists the commands)\n")


def parser() -> argparse.ArgumentParser:
    listed = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    p = _Parser(
        prog="fedmef",
        description="Federated dynamic pruning (FedMef): every step of an experiment as a Prefect flow.",
        epilog=f"commands:\n{listed}\n\nRun from a folder holding params.yaml (or pass --params PATH); "
        "`fedmef COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fedmef {package_version()}")
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="OPTIONS",
                   help="the command's options: --params FILE, --set section.key=value, ...")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if not argv:
        p.error(f"name a command: {', '.join(COMMANDS)}")
    args = p.parse_args(argv)
    module, _ = COMMANDS[args.command]
    importlib.import_module(module).main(args.args, prog=f"fedmef {args.command}")


if __name__ == "__main__":
    main()
