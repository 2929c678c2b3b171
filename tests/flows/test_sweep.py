"""The sweep flow, run for real under Prefect's test harness with a real sqlite MLflow store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset, partition_indices
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server
from fedmef_core.runs import run_paths
from flows.sweep import spec_from_args, sweep_flow
from services.sweep import experiments, parse_spec, plan_cells
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def write_params(tmp_path: Path) -> Path:
    """The tiny config as a params file, tracked, with the run folders left to the sweep."""
    raw = tiny_raw()
    raw["federation"]["rounds"] = 2
    raw["pruning"] = {"adjust_interval": 1, "adjust_until": 2, "adjust_alpha": 0.2}
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sweep"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def spec(tmp_path: Path, **fields):
    return parse_spec({"methods": ["fedavg_static", "fedtiny"], "densities": [0.2], "seeds": [0, 1],
                       "params": str(write_params(tmp_path)), "root": str(tmp_path / "runs"), "name": "tiny",
                       **fields})


def test_cells_share_partitions_by_seed_and_dense_cells_run_once(tmp_path):
    cells = plan_cells(spec(tmp_path, methods=["fedavg", "fedtiny"], densities=[0.1, 0.2]))
    assert len(cells) == 8 and len(experiments(cells)) == 2 + 4  # fedavg: one run per seed, not per density
    dirs = {(c.method, c.density, c.seed): c.config.runtime.partitions_dir for c in cells}
    assert dirs["fedavg", 0.1, 0] == dirs["fedtiny", 0.2, 0] != dirs["fedtiny", 0.2, 1]
    # the cell's seed is the top-level one; params.yaml's explicit section seeds (tiny_raw's 1 and 3) follow it
    assert all(c.config.seed == c.config.federation.seed == c.config.partition.seed == c.seed for c in cells)
    assert len({str(run_paths(c.config).root) for c in cells}) == 6


def test_one_seed_starts_every_method_from_the_same_weights_and_mask(tmp_path):
    """What makes the paired difference paired: federation.seed seeds the initialisation and the random mask."""
    static, tiny = (c.config for c in plan_cells(spec(tmp_path, seeds=[0])))
    train, test = load_dataset(static.data)
    parts = partition_indices(train.labels.numpy(), static.federation.num_clients, static.partition)
    a, b = (Server(c, train, test, parts, resolve_device("cpu")) for c in (static, tiny))
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name
    assert a.sample_clients(1) == b.sample_clients(1)


def _artifacts(flow_run_id: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            response = await client._client.post("/artifacts/filter", json={"limit": 200, "offset": 0})
            return response.json()

    return [a for a in asyncio.run(read()) if a["flow_run_id"] == flow_run_id]


def test_sweep_runs_children_under_one_parent_and_resumes_only_the_unfinished_cell(prefect_harness, tmp_path,
                                                                                   caplog):
    sweep = spec(tmp_path, jobs=2)
    first = sweep_flow(sweep)
    assert sorted(map(tuple, first["steps"].values())) == [("train", "evaluate")] * 4
    assert all(f"sweep: {i}/4 experiments done" in caplog.text for i in (1, 2, 3, 4))  # progress, as cells end

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert parent.data.params["methods"] == "fedavg_static,fedtiny" and parent.data.params["reference"] == "fedtiny"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((c.data.tags["method"], c.data.tags["seed"]) for c in children) == [
        ("fedavg_static", "0"), ("fedavg_static", "1"), ("fedtiny", "0"), ("fedtiny", "1")]
    assert {c.info.run_id for c in children} == {cell["mlflow_run_id"] for cell in first["cells"]}
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison.csv", "comparison/curves.png",
            "comparison/accuracy_memory.png"} <= artifacts
    table = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.md", str(tmp_path))).read_text()
    assert "| fedavg_static | 0.2 | 2 |" in table and "| fedavg_static | 0.2 | 2 | " in table.split("Paired")[1]
    cells = {(c["method"], c["seed"]): c for c in first["cells"]}
    # compared on the mean of the last evaluated rounds (both of these 2-round runs), the last round's beside it
    assert all(c["mean_last"] == pytest.approx(sum(a for _, a in c["curve"]) / 2) for c in first["cells"])
    diff = cells["fedavg_static", 0]["mean_last"] - cells["fedtiny", 0]["mean_last"]
    diff1 = cells["fedavg_static", 1]["mean_last"] - cells["fedtiny", 1]["mean_last"]
    assert parent.data.metrics["diff_mean/fedavg_static-fedtiny/d0.2"] == pytest.approx((diff + diff1) / 2)
    assert parent.data.metrics["acc_mean/fedtiny/d0.2"] == pytest.approx(
        (cells["fedtiny", 0]["mean_last"] + cells["fedtiny", 1]["mean_last"]) / 2)
    assert parent.data.metrics["acc_last_round/fedtiny/d0.2"] == pytest.approx(
        (cells["fedtiny", 0]["accuracy"] + cells["fedtiny", 1]["accuracy"]) / 2)
    assert cells["fedtiny", 0]["post_adjust_drop"] is not None and cells["fedavg_static", 0]["post_adjust_drop"] is None
    assert all(c["footprint_bytes"] > 0 and [r for r, _ in c["curve"]] == [1, 2] for c in first["cells"])
    assert parent.data.tags["mlflow.note.content"] == first["markdown"]  # the comparison, as its description

    # the registry: each cell's model is a version of fedmef-cnn, the aliases point at the best by test accuracy
    by_run = {c["mlflow_run_id"]: c for c in first["cells"]}
    assert len(client.search_model_versions("name = 'fedmef-cnn'")) == 4
    assert [a["alias"] for a in first["aliases"]] == ["best-fedavg_static", "best-fedtiny", "champion"]
    for alias, method in [("best-fedavg_static", "fedavg_static"), ("best-fedtiny", "fedtiny"), ("champion", None)]:
        cell = by_run[client.get_model_version_by_alias("fedmef-cnn", alias).run_id]
        assert cell["method"] == (method or cell["method"])
        assert cell["accuracy"] == max(c["accuracy"] for c in first["cells"] if method in (None, c["method"]))
    flow_run_id = parent.data.tags["prefect_flow_run_id"]
    markdown = [a for a in _artifacts(flow_run_id) if a["key"] == "sweep-comparison"]
    assert markdown and "Paired difference against fedtiny" in markdown[0]["data"]

    # a kill while one cell was finishing: its final checkpoint and evaluation are gone
    killed = Path(cells["fedtiny", 1]["run_dir"])
    for name in ("checkpoints/final.pt", "checkpoints/final.pt.sha256", "metrics/eval.json"):
        (killed / name).unlink()
    untouched = Path(cells["fedtiny", 0]["run_dir"]) / "metrics" / "train.json"
    mtime = untouched.stat().st_mtime_ns
    second = sweep_flow(spec(tmp_path, jobs=1))
    assert {name: steps for name, steps in second["steps"].items() if steps} == {killed.name: ["train", "evaluate"]}
    assert second["parent_run_id"] == first["parent_run_id"] and untouched.stat().st_mtime_ns == mtime
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4  # the resumed cell continued its own child run
    assert second["cells"] == first["cells"]  # same seeds, same numbers
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    params = write_params(tmp_path)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for args, expected in [
        (["--methods", "fedtiny", "magic"], "methods.1"),
        (["--methods", "fedtiny", "--set", "federation.roundz=2"], "federation.roundz: unknown key"),
        (["--methods", "fedtiny", "--reference", "fedmef"], "reference 'fedmef' is not among the methods"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(params), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_method_scoped_overrides_reach_only_that_method():
    s = spec_from_args(["--methods", "fedtiny", "fedmef", "--set", "federation.rounds=3",
                        "--set", "fedmef:pruning.bae_lambda=1.0"])
    assert s.overrides == {"federation.rounds": 3} and s.method_overrides == {"fedmef": {"pruning.bae_lambda": 1.0}}
    assert os.path.basename(s.params) == "params.yaml" and s.reference_method == "fedtiny"


def test_sweep_deployment_form_has_method_choices(prefect_harness):
    from flows.deployments import deployments

    sweep = next(d for d in deployments(parse_config({})) if d.flow_name == "sweep")
    schema = sweep._parameter_openapi_schema.model_dump()
    props = schema["definitions"]["SweepSpec"]["properties"]
    assert "fedmef" in props["methods"]["items"]["enum"] and props["densities"]["description"]
    assert sweep.parameters["spec"]["methods"] == ["fedavg", "fedtiny", "fedmef"]


def test_cells_built_in_parallel_threads_start_from_their_own_seed(tmp_path):
    """`--jobs` cells share one process: torch's global RNG, which draws the initial weights, must not be
    shared mid-draw (by another server's start, or a neighbour's client building its model), or a cell's start
    depends on its neighbour's timing."""
    import threading

    from fedmef_core.models import build_model

    configs = [c.config for c in plan_cells(spec(tmp_path, methods=["fedtiny"], seeds=[0, 1, 2, 3]))]
    train, test = load_dataset(configs[0].data)
    parts = partition_indices(train.labels.numpy(), configs[0].federation.num_clients, configs[0].partition)

    def weights(config):
        return Server(config, train, test, parts, resolve_device("cpu")).model.state_dict()

    def build(i, built, barrier):
        barrier.wait()
        built[i] = weights(configs[i])

    def client_builds(barrier):  # what a neighbouring cell's clients do all the time
        barrier.wait()
        for _ in range(20):
            build_model(configs[0].model, 1, 10, 28)

    alone = [weights(c) for c in configs]
    for _ in range(10):
        built: dict[int, dict] = {}
        barrier = threading.Barrier(len(configs))
        threads = [threading.Thread(target=build, args=(i, built, barrier)) for i in range(len(configs) - 1)]
        threads.append(threading.Thread(target=client_builds, args=(barrier,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, reference in enumerate(alone[:-1]):
            assert all(torch.equal(reference[k], built[i][k]) for k in reference), f"seed {i}"


def _sweep_cli(tmp_path: Path, *args: str):
    from flows.sweep import main

    return main(["--methods", "fedavg", "--params", str(write_params(tmp_path)), "--root", str(tmp_path / "runs"),
                 *args])


def test_a_sweep_named_with_a_quote_runs_and_a_re_run_finds_its_parent_run(prefect_harness, tmp_path):
    """`o'brien` ended in MLflow's filter-syntax traceback when the sweep looked for its parent run."""
    first = _sweep_cli(tmp_path, "--name", "o'brien")
    again = _sweep_cli(tmp_path, "--name", "o'brien")
    assert again["parent_run_id"] == first["parent_run_id"] and not any(again["steps"].values())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                 "tags.sweep_digest != ''")
    assert [p.info.run_name for p in parents] == ["o'brien"]
    assert (tmp_path / "runs" / "sweeps" / "o'brien" / "comparison.md").is_file()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "/tmp/x", "both'\"quotes"])
def test_a_sweep_name_that_would_leave_its_root_or_break_a_search_is_refused(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as ended:
        _sweep_cli(tmp_path, "--name", name)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: the sweep is invalid:\n- name: ") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written, no store made


def test_an_unwritable_sweep_root_is_one_message_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as ended:
        _sweep_cli(tmp_path, "--root", str(tmp_path / "a-file" / "runs"))  # the last --root wins
    err = capsys.readouterr().err
    assert ended.value.code == 2
    assert err == f"error: --root: cannot write to {tmp_path / 'a-file' / 'runs'} (Not a directory); set --root to a " \
        "folder you can write\n"


def test_budgets_are_fractions_of_the_dense_footprint_the_same_for_every_method(tmp_path):
    from services.sweep import dense_footprint_mib

    s = spec(tmp_path, methods=["fedavg", "fedmef"], densities=[0.2], seeds=[0], budgets=[0.25, 1.0])
    dense = dense_footprint_mib(s, 0)
    cells = plan_cells(s)
    assert [(c.method, c.budget) for c in cells] == [("fedavg", 0.25), ("fedavg", 1.0), ("fedmef", 0.25),
                                                      ("fedmef", 1.0)]
    for c in cells:
        d = c.config.devices
        assert (d.profile, d.policy, len(d.tiers)) == ("tiers", "accumulate", 1)
        assert d.tiers[0].memory_mib == c.budget * dense and d.tiers[0].share == 1.0
    assert len({str(run_paths(c.config).root) for c in cells}) == 4  # a budget is part of the experiment


def test_a_budget_sweep_trains_every_method_under_each_budget_and_compares_per_budget(prefect_harness, tmp_path):
    s = spec(tmp_path, methods=["fedavg", "fedmef"], densities=[0.2], seeds=[0], budgets=[0.25, 1.0])
    out = sweep_flow(s)
    cells = {(c["method"], c["budget"]): c for c in out["cells"]}
    assert set(cells) == {("fedavg", 0.25), ("fedavg", 1.0), ("fedmef", 0.25), ("fedmef", 1.0)}
    # a quarter of dense FedAvg's footprint: dense FedAvg trains in micro-batches (accumulate), nobody is left out
    assert all(c["participation"] == 1.0 for c in cells.values())
    csv_text = (tmp_path / "runs" / "sweeps" / "tiny" / "comparison.csv").read_text()
    assert csv_text.splitlines()[0].startswith("kind,method,reference,density,budget,")
    assert {p["budget"] for p in out["paired"]} == {0.25, 1.0}
    devices = (run_paths(plan_cells(s)[0].config).metrics / "devices.csv").read_text().splitlines()
    assert devices[0].split(",")[5:7] == ["batch_size", "micro_batch"]
    assert all(line.split(",")[5] == "32" and int(line.split(",")[6]) < 32 for line in devices[1:])


def test_a_cell_in_which_no_client_trained_ends_the_sweep_with_one_line_and_no_traceback(prefect_harness, tmp_path,
                                                                                       capfd):
    """The sweep flow let Prefect log a task traceback and a flow traceback (71 lines) before the one line."""
    import logging

    from flows.cli import RUN_LOGGERS

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    kept = Kept()
    for name in RUN_LOGGERS:
        logging.getLogger(name).addHandler(kept)
    try:
        with pytest.raises(SystemExit) as ended:
            _sweep_cli(tmp_path, "--name", "empty", "--set", "devices.profile=tiers",
                       "--set", "devices.tiers=[{name: t, memory_mib: 0.5, share: 1.0}]")
    finally:
        for name in RUN_LOGGERS:
            logging.getLogger(name).removeHandler(kept)
    assert ended.value.code == 2
    out = capfd.readouterr()
    assert "no client trained in any of the 2 rounds" in out.err and "Traceback" not in out.out + out.err
    assert kept.records and not [r for r in kept.records if r.exc_info or r.exc_text]  # no traceback in the logs
