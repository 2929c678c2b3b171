"""Train flow: federated rounds in order, one Prefect task per wave of client updates, tracked in MLflow.

The whole training, top to bottom: hold the run folder, resume or start (:mod:`fedmef_core.resume`'s policy),
open the MLflow run, then the one round loop of the core (:func:`fedmef_core.engine.run_rounds`) with this
flow's executor (Prefect tasks, :func:`tasks.clients.client_updates`), its stops (training and aggregation
interruptible, writes not) and, after each round, :class:`RoundOutputs`: devices, report, checkpoint, masks.
"""

from __future__ import annotations

from prefect import flow

from fedmef_core.config import ExperimentConfig
from fedmef_core.engine import Server, run_rounds
from fedmef_core.evaluation import mean_last_key
from fedmef_core.resume import resume
from fedmef_core.rounds import RoundObserver, RoundOutcome, no_client_trained, untrained
from fedmef_core.runs import run_facts, run_lock, run_name, run_paths
from flows import cli
from flows.cli import fails_cleanly
from flows.lifecycle import safe_points
from services.tracking.logged_models import log_final_model
from services.tracking.tracker import Tracker, run_description, tracked_run
from tasks import preflight
from tasks.checkpoints import RoundSaver, start_server
from tasks.clients import client_updates
from tasks.devices import DeviceReporter
from tasks.memory import client_step_report, log_memory_report
from tasks.outputs import RoundReporter
from tasks.partitioning import partition_dataset, partition_missing
from tasks.reporting import publish_summary

METRICS_EVERY_S = 2.0  # per-round metrics go to MLflow in one batch at most this often (and at checkpoints)


class RoundOutputs(RoundObserver):
    """What the pipeline does after the setup exchange, each round and the last one, in this order."""

    def __init__(self, report: RoundReporter, devices: DeviceReporter, save: RoundSaver, tracker: Tracker):
        self.report, self.devices, self.save, self.tracker = report, devices, save, tracker

    def setup_done(self, server: Server, metrics: dict[str, float]) -> None:
        self.report.setup(metrics)

    def round_done(self, server: Server, outcome: RoundOutcome) -> None:
        self.devices(server)
        self.report(server, outcome.round, outcome.metrics)
        if self.save.due(outcome.round):  # a resume will not run this checkpoint's rounds again: log them first
            self.tracker.flush()
        if masks := self.save.save(server, outcome):
            self.tracker.log_artifact(masks, "masks")

    def training_done(self, server: Server) -> None:
        self.save.save_final(server)


def train(config: ExperimentConfig, tags: dict[str, str] | None = None) -> dict:
    """One experiment in its run folder: the round loop. `tags` go on a new MLflow run (e.g. a sweep's
    parent run id). Called by the train flow and by every cell of a sweep."""
    paths = run_paths(config)
    with run_lock(paths):
        server = start_server(config)
        memory = client_step_report(config, server.model, server.train, server.device)  # of the initial model
        start = resume(server, paths)
        if start.finished is not None:
            return {**start.finished, "rounds_run": 0}  # nothing left to train: its outputs and MLflow run stay
        with tracked_run(config, run_name(config), start.mlflow_run_id or None, tags,
                         send_every_s=METRICS_EVERY_S) as tracker, client_updates(config, paths) as updates:
            log_memory_report(config, memory, paths, tracker if start.fresh else None)
            tracker.log_partition(config, start.partition, [len(part) for part in server.parts])  # its dataset
            facts = run_facts(config, start.partition, tracker.run_id or "")  # run.json: what names this run
            report = RoundReporter(config, paths, tracker, first_round=server.round + 1)
            devices = DeviceReporter(config, paths, tracker, server)
            outputs = RoundOutputs(report, devices, RoundSaver(config, paths, facts, fresh=start.fresh), tracker)
            # Ctrl-C / SIGTERM: at once while clients train or the server aggregates, else after the round's writes
            run_rounds(server, updates, observers=[outputs], stops=safe_points)
            if untrained(server.history):  # every sampled client excluded or over budget, every round
                error = no_client_trained(config, len(server.history), "no model is registered")
                tracker.describe(f"{run_description(config)}\n\n**failed**: {error}")
                raise error  # the run ends FAILED; no results are written
            model_uri = log_final_model(config, server, tracker)  # MLflow's logged model, a registry version
            summary = report.finish(server, facts, model_uri)
            if device_summary := devices.finish(server):
                summary["devices"] = device_summary
    return summary


@flow(name="train", log_prints=True)
@fails_cleanly
def train_flow(config: ExperimentConfig = ExperimentConfig()) -> dict:
    """Run federated training and write checkpoints, per-round metrics and the MLflow run."""
    if partition_missing(config):  # e.g. from the UI, where `dvc repro partition` is not at hand
        preflight.for_partition(config)
        made = partition_dataset(config)
        print(f"{config.runtime.partitions_dir} held no partition: made it as the partition stage does "
              f"({made['num_clients']} clients, {made['min_size']}-{made['max_size']} samples each)")
    summary = train(config)
    done = (f"trained rounds {summary['rounds'] - summary['rounds_run'] + 1}-{summary['rounds']} in "
            f"{summary['seconds']:.0f}s" if summary["rounds_run"] else
            f"all {summary['rounds']} rounds were already trained (runtime.resume: false trains again)")
    k = config.runtime.eval_mean_last
    model = f", model {summary['model_uri']}" if summary.get("model_uri") else ""
    print(f"{done}: accuracy {summary['accuracy']:.4f} (mean of the last {k} evaluated rounds "
          f"{summary[mean_last_key(k)]:.4f}), MLflow run {summary['mlflow_run_id'] or '(tracking off)'}"
          f"{model}, outputs in {run_paths(config).root}")
    publish_summary(config, summary)
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`python -m flows.train` or `fedmef train` [--params FILE] [--set section.key=value ...]."""
    return cli.main(train_flow, preflight.for_train, argv, prog)


if __name__ == "__main__":
    main()
