"""The resume policy (fedmef_core/resume.py): what a checkpoint must match, which one, the MLflow run to continue."""

import pytest
import torch

from fedmef_core.checkpoint import load_checkpoint, round_checkpoints, save_checkpoint
from fedmef_core.config import parse_config
from fedmef_core.engine import TIMING_KEYS, run_rounds
from fedmef_core.io import write_json
from fedmef_core.resume import resume, split_of
from fedmef_core.rounds import Checkpoints
from fedmef_core.runs import run_facts, run_paths, write_run_facts
from tests.conftest import data_of, server_of, tiny_raw


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


LYING_STATES = {  # a server state that passes its checksum but is not this method's, and what the skip says
    "a field the method does not keep": (lambda s: s.update(surprise=torch.zeros(1)), "surprise"),
    "the mask of a layer the model lacks": (
        lambda s: s["masks"].update({"nope.weight": torch.ones(3, dtype=torch.bool)}), "'nope.weight'"),
    "no mask for a layer": (lambda s: s["masks"].pop(sorted(s["masks"])[0]), "missing"),
}


@pytest.mark.parametrize("edit, says", LYING_STATES.values(), ids=LYING_STATES.keys())
def test_a_checkpoint_whose_server_state_lies_is_skipped_and_the_previous_one_resumes(tmp_path, capsys, edit, says):
    config = parse_config({**tiny_raw(tmp_path), "pruning": {"method": "fedavg_static", "density": 0.3}})
    data = data_of(config)
    paths, _ = _trained(config, split_of(server_of(config, data)))
    newest = round_checkpoints(paths.checkpoints)[-1][1]
    ckpt = load_checkpoint(newest)
    edit(ckpt["server_state"])
    save_checkpoint(newest, ckpt)  # a valid checksum
    server = server_of(config, data)
    start = resume(server, paths)
    assert server.round == int(start.checkpoint["round"]) == config.federation.rounds - 1
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint skipped")]
    assert len(skipped) == 1 and newest.name in skipped[0] and says in skipped[0]
    assert run_rounds(server)[-1]["round"] == config.federation.rounds


def test_a_training_in_which_no_client_ever_trained_is_not_finished_and_trains_again(tmp_path, capsys):
    raw = tiny_raw(tmp_path)
    raw["devices"] = {"profile": "tiers", "policy": "exclude", "tiers": [{"name": "tiny", "memory_mib": 0.5,
                                                                         "share": 1.0}]}
    config = parse_config(raw)
    data = data_of(config)
    paths, untrained = _trained(config, split_of(server_of(config, data)))
    assert [row["clients"] for row in untrained.history] == [0, 0, 0]
    # its end written as if it had finished (what an earlier version left): results, run facts, a registered model
    (paths.metrics / "rounds.csv").write_text("round,accuracy,loss,train_loss,lr\n")
    write_json(paths.metrics / "train.json", {"accuracy": 0.1, "loss": 2.3, "rounds": 3, "method": "fedavg"})
    write_run_facts(paths, {**run_facts(config, split_of(untrained), "run-1"), "rounds_run": 3, "seconds": 1.0,
                            "seconds_per_round": 0.3, "model_uri": "models:/fedmef-cnn/1"})
    server = server_of(config, data)
    start = resume(server, paths)
    assert start.fresh and start.finished is None and server.round == 0
    assert "trained no client in any of its rounds (its model is the initial one): training again from round 1" in \
        capsys.readouterr().out
