"""The resume policy (fedmef_core/resume.py): what a checkpoint must match, which one, the MLflow run to continue."""

from fedmef_core.checkpoint import round_checkpoints
from fedmef_core.engine import TIMING_KEYS, run_rounds
from fedmef_core.resume import resume, split_of
from fedmef_core.rounds import Checkpoints
from fedmef_core.runs import run_facts, run_paths, write_run_facts
from tests.conftest import data_of, server_of


def _trained(config, split: str):
    """The run folder of `config` after a training whose checkpoints say they were written on `split`."""
    paths = run_paths(config)
    server = server_of(config)
    run_rounds(server, observers=[Checkpoints.of(config, paths.checkpoints, extra=lambda: {"partition": split})])
    write_run_facts(paths, run_facts(config, split, "run-1"))
    return paths, server


def test_the_newest_checkpoint_of_this_experiment_and_split_resumes_and_names_its_mlflow_run(tiny_config):
    data = data_of(tiny_config)
    paths, trained = _trained(tiny_config, split_of(server_of(tiny_config, data)))
    (round_checkpoints(paths.checkpoints)[-1][1]).write_bytes(b"damaged")  # the newest: skipped
    server = server_of(tiny_config, data)
    start = resume(server, paths)
    assert not start.fresh and start.finished is None and start.mlflow_run_id == "run-1"
    assert server.round == int(start.checkpoint["round"]) == tiny_config.federation.rounds - 1
    assert server.history == [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in trained.history[:-1]]


def test_a_checkpoint_of_another_split_or_with_resume_off_starts_afresh(tiny_config):
    paths, _ = _trained(tiny_config, "another split")
    server = server_of(tiny_config)
    start = resume(server, paths)
    assert start.fresh and start.mlflow_run_id == "" and server.round == 0
    assert start.partition == split_of(server)
    off = tiny_config.model_copy(update={"runtime": tiny_config.runtime.model_copy(update={"resume": False})})
    _trained(off, split_of(server))
    assert resume(server_of(off), run_paths(off)).fresh
