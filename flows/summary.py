"""Print a short summary of a finished run: `python -m flows.summary [--params FILE] [--set k=v ...]`.

`make run` asks for the DVC pipeline's run (`--set runtime.run_dir=.`); without it, the run folder is the
one the config gives (`runs/<name>` by default).
"""

from __future__ import annotations

import sys

from fedmef_core.config import ExperimentConfig
from fedmef_core.errors import UserError
from fedmef_core.evaluation import mean_last_key
from fedmef_core.runs import read_eval_metrics, read_run_facts, read_train_metrics, run_paths
from flows.cli import config_from_args


def summary_text(config: ExperimentConfig) -> str:
    paths = run_paths(config)
    train, evaluation = read_train_metrics(paths), read_eval_metrics(paths)
    facts = read_run_facts(paths, config, finished=True)  # None where the outputs came from `dvc pull`
    timing = f" ({facts['seconds_per_round']:.2f} s/round, {facts['seconds']:.0f} s total)" if facts else ""
    uri = config.tracking.mlflow_uri
    lines = [
        "",
        "=== fedmef: run summary ===",
        f"method        {train['method']} d={config.pruning.density:g} ({config.model.arch}/{config.model.norm} on "
        f"{config.data.name}, {config.partition.scheme} partition, SAP {'on' if config.sap.enabled else 'off'})",
        f"rounds        {train['rounds']}{timing}",
        f"test accuracy {evaluation['accuracy']:.4f}   (loss {evaluation['loss']:.4f}; mean of the last "
        f"{config.runtime.eval_mean_last} evaluated rounds "
        f"{train.get(mean_last_key(config.runtime.eval_mean_last), float('nan')):.4f})",
        f"metrics       {paths.metrics / 'train.json'}, {paths.metrics / 'eval.json'}, {paths.metrics / 'rounds.csv'}",
        f"plots         {paths.plots}/ ({', '.join(sorted(p.name for p in paths.plots.glob('*.png')))})",
    ]
    if facts and facts["mlflow_run_id"]:
        lines += [
            f"MLflow run    {facts['mlflow_run_id']} in experiment {config.tracking.experiment!r}",
            f"              mlflow ui --backend-store-uri {uri}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    try:
        print(summary_text(config_from_args(argv, "Summarise a finished run.", prog)))
    except UserError as exc:  # a bad config, a metrics file that does not hold what was written
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as exc:
        print(f"error: no finished run to summarise ({exc}); run `make run` first", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
