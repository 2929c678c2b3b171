"""What a training reports: per round (MLflow metrics, `rounds.csv`, a progress line) and at the end
(`train.json`, `run.json`, plots, MLflow artifacts)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from fedmef_core.checkpoint import FINAL_NAME
from fedmef_core.config import ExperimentConfig
from fedmef_core.engine import Server
from fedmef_core.evaluation import mean_last_key, mean_of_last
from fedmef_core.io import write_json, write_text
from fedmef_core.plots import plot_round_curves
from fedmef_core.runs import RunPaths, write_run_facts
from services.tracking.tracker import Tracker, run_description
from tasks.masks import write_mask_plots
from tasks.partitioning import partition_plot_path
from tasks.progress import RoundProgress

ROUND_COLUMNS = ("round", "accuracy", "loss", "train_loss", "lr")


def rounds_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROUND_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        if "accuracy" in row:
            writer.writerow({k: row.get(k, "") for k in ROUND_COLUMNS})
    return buf.getvalue()


class RoundReporter:
    """After each round: its metrics to MLflow (step = round), `rounds.csv`, the progress line/artifact."""

    def __init__(self, config: ExperimentConfig, paths: RunPaths, tracker: Tracker, first_round: int):
        self.config, self.paths, self.tracker = config, paths, tracker
        self.first_round = first_round
        self.started = time.perf_counter()
        self.progress = RoundProgress(config.federation.rounds, first_round=first_round)

    def setup(self, metrics: dict[str, float]) -> None:
        """The method's setup exchange before round 1 (FedTiny's adaptive BN selection), at step 0."""
        if not metrics:
            return
        self.tracker.log_metrics(metrics, step=0)
        described = ", ".join(f"{k.rpartition('/')[2]} {v:.4g}" for k, v in metrics.items())
        print(f"setup before round 1: {described}", flush=True)

    def __call__(self, server: Server, rnd: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "round"}, step=rnd)
        write_text(self.paths.metrics / "rounds.csv", rounds_csv(server.history))
        self.progress.update(rnd, metrics)

    def finish(self, server: Server, facts: dict, model_uri: str = "") -> dict:
        """`train.json` (the results: the same for identical runs, bit for bit), `run.json` (`facts`, see
        :func:`~fedmef_core.runs.run_facts`, plus this run's time, rounds run and `model_uri`, the model's version
        in MLflow's registry if logged), the curves and mask plots, the run's artifacts and description; returns
        both files' contents as one summary."""
        cfg, paths, tracker = self.config, self.paths, self.tracker
        seconds = time.perf_counter() - self.started
        ran = cfg.federation.rounds - self.first_round + 1
        final = server.history[-1]
        mean_last = mean_of_last(server.history, cfg.runtime.eval_mean_last)
        results = {
            "accuracy": final["accuracy"],
            mean_last_key(cfg.runtime.eval_mean_last): mean_last,
            "loss": final["loss"],
            "rounds": cfg.federation.rounds,
            "method": cfg.pruning.method,
            "density": cfg.pruning.density,
            "seed": cfg.federation.seed,
        }
        facts = {
            **facts,
            "rounds_run": ran,  # in this process; fewer than `rounds` after a resume
            "seconds": round(seconds, 2),
            "seconds_per_round": round(seconds / max(ran, 1), 3),
            "model_uri": model_uri,
        }
        write_json(paths.metrics / "train.json", results)
        write_run_facts(paths, facts)
        title = f"{cfg.pruning.method} d={cfg.pruning.density:g}"
        plot_round_curves(server.history, paths.plots / "accuracy.png", title=f"{title} on {cfg.data.name}")
        write_mask_plots(server, paths.plots, tracker, title=title)
        tracker.log_metrics({"final_accuracy": final["accuracy"], "final_accuracy_mean_last": mean_last,
                             "train_seconds": seconds}, step=cfg.federation.rounds)
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.describe(run_description(cfg, final["accuracy"]))
        for path, where in [
            (partition_plot_path(cfg), "plots"),
            (paths.plots / "accuracy.png", "plots"),
            (paths.metrics / "rounds.csv", None),
            (paths.checkpoints / FINAL_NAME, "checkpoints"),
        ]:
            if Path(path).exists():
                tracker.log_artifact(path, where)
        return {**results, **facts}
