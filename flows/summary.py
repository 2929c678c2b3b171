"""Print a short summary of the last run: `python -m flows.summary`."""

from __future__ import annotations

import sys
from pathlib import Path

from fedmef_core.config import ConfigError, load_config
from fedmef_core.io import read_json


def summary_text(params: str = "params.yaml") -> str:
    config = load_config(params)
    metrics, plots = Path(config.runtime.metrics_dir), Path(config.runtime.plots_dir)
    train, evaluation = read_json(metrics / "train.json"), read_json(metrics / "eval.json")
    uri = config.tracking.mlflow_uri
    lines = [
        "",
        "=== fedmef: run summary ===",
        f"method        {train['method']} ({config.model.arch} on {config.data.name}, "
        f"{config.partition.scheme} partition)",
        f"rounds        {train['rounds']} ({train['seconds_per_round']:.2f} s/round, {train['seconds']:.0f} s total)",
        f"test accuracy {evaluation['accuracy']:.4f}   (loss {evaluation['loss']:.4f})",
        f"metrics       {metrics / 'train.json'}, {metrics / 'eval.json'}, {metrics / 'rounds.csv'}",
        f"plots         {config.runtime.plots_dir}/ ({', '.join(sorted(p.name for p in plots.glob('*.png')))})",
    ]
    if train.get("mlflow_run_id"):
        lines += [
            f"MLflow run    {train['mlflow_run_id']} in experiment {config.tracking.experiment!r}",
            f"              mlflow ui --backend-store-uri {uri}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print(summary_text(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: no finished run to summarise ({exc}); run `make run` first", file=sys.stderr)
        sys.exit(2)
