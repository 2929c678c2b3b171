"""Train flow: federated rounds in order, one Prefect task per wave of client updates, tracked in MLflow.

The whole training, top to bottom: hold the run folder, resume or start, then per round broadcast,
client updates, aggregate, checkpoint, report.
"""

from __future__ import annotations

import time

from prefect import flow

from fedmef_core.config import ExperimentConfig
from fedmef_core.data import split_digest
from fedmef_core.evaluation import mean_last_key
from fedmef_core.runs import run_facts, run_lock, run_name, run_paths
from flows import cli
from flows.cli import fails_cleanly
from flows.lifecycle import safe_points
from services.tracking.logged_models import log_final_model
from services.tracking.tracker import tracked_run
from tasks import preflight
from tasks.checkpoints import RoundSaver, finished_summary, resume, start_server, training_run_id
from tasks.clients import client_updates
from tasks.devices import DeviceReporter
from tasks.memory import client_step_report, log_memory_report
from tasks.outputs import RoundReporter
from tasks.reporting import publish_summary

METRICS_EVERY_S = 2.0  # per-round metrics go to MLflow in one batch at most this often (and at checkpoints)


def train(config: ExperimentConfig, tags: dict[str, str] | None = None) -> dict:
    """One experiment in its run folder: the round loop. `tags` go on a new MLflow run (e.g. a sweep's
    parent run id). Called by the train flow and by every cell of a sweep."""
    paths = run_paths(config)
    with run_lock(paths):
        server = start_server(config)
        memory = client_step_report(config, server.model, server.train, server.device)  # of the initial model
        partition = split_digest(server.parts)  # part of what a checkpoint must match to be resumed
        if server.fleet is not None:  # and the devices' budgets, with it
            partition += f"+devices-{server.fleet.assignment.digest()}"
        resumed = resume(server, config, paths, partition)
        if resumed is not None and (done := finished_summary(config, paths, resumed)) is not None:
            return {**done, "rounds_run": 0}  # nothing left to train: its outputs and MLflow run stay as they are
        run_id = training_run_id(config, paths, resumed) if resumed is not None else ""
        with tracked_run(config, run_name(config), run_id or None, tags, send_every_s=METRICS_EVERY_S) as tracker, \
                client_updates(config, paths) as updates:
            log_memory_report(config, memory, paths, tracker if resumed is None else None)
            tracker.log_partition(config, partition, [len(part) for part in server.parts])  # the run's dataset
            facts = run_facts(config, partition, tracker.run_id or "")  # run.json: what names this run
            save = RoundSaver(config, paths, facts, fresh=resumed is None)
            report = RoundReporter(config, paths, tracker, first_round=server.round + 1)
            devices = DeviceReporter(config, paths, tracker, server)
            report.setup(server.setup(updates))
            with safe_points() as stop:  # Ctrl-C / SIGTERM: at once while clients train, else after the writes
                for rnd in server.pending_rounds():
                    started = time.perf_counter()
                    with stop.interruptible():  # training and aggregation change nothing on disk
                        plan = server.plan_round(rnd)  # who trains, at which batch and SAP gamma, who cannot
                        results = updates(server.broadcast(rnd, plan), plan.trained) if plan.trained else None
                        metrics = server.finish_round(rnd, results or [], time.perf_counter() - started, plan)
                    metrics["dropped_clients"] = results.dropped if results is not None else 0
                    devices(server)
                    report(server, rnd, metrics)
                    save(server, rnd, metrics, tracker)  # a checkpoint first sends the metrics held back
            save.final(server)
            model_uri = log_final_model(config, server, tracker)  # MLflow's logged model, a registry version
            summary = report.finish(server, facts, model_uri)
            if device_summary := devices.finish(server):
                summary["devices"] = device_summary
    return summary


@flow(name="train", log_prints=True)
@fails_cleanly
def train_flow(config: ExperimentConfig = ExperimentConfig()) -> dict:
    """Run federated training and write checkpoints, per-round metrics and the MLflow run."""
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
