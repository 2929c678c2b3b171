import hashlib
import re

import pytest
import torch

from fedmef_core.checkpoint import (
    CheckpointError,
    check_layout,
    latest_good_checkpoint,
    load_checkpoint,
    load_exchange,
    remove_checkpoints,
    round_checkpoint_path,
    round_checkpoints,
    save_checkpoint,
    save_exchange,
)


def _payload(r: int, **changes) -> dict:
    """What `Server.checkpoint` writes, with a model of one weight `w` (64 entries of `r`)."""
    return {"format": 1, "round": r, "model": {"w": torch.full((64,), float(r))}, "server_state": {}, "history": [],
            "torch_rng": torch.get_rng_state(), "config": {}, "extra": {}, **changes}


def _save_rounds(tmp_path, rounds):
    for r in rounds:
        save_checkpoint(round_checkpoint_path(tmp_path, r), _payload(r))


def test_roundtrip_and_listing(tmp_path):
    _save_rounds(tmp_path, [1, 2, 10])
    assert [r for r, _ in round_checkpoints(tmp_path)] == [1, 2, 10]
    ckpt = load_checkpoint(round_checkpoint_path(tmp_path, 2))
    assert ckpt["round"] == 2 and torch.equal(ckpt["model"]["w"], torch.full((64,), 2.0))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    _save_rounds(tmp_path, [1, 2, 3])
    newest = round_checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])
    try:
        load_checkpoint(newest)
        raise AssertionError("a truncated checkpoint was loaded")
    except CheckpointError as exc:
        assert "checksum mismatch" in str(exc)
    skipped = []
    ckpt = latest_good_checkpoint(tmp_path, on_skip=skipped.append)
    assert ckpt["round"] == 2
    assert len(skipped) == 1 and "round_0003.pt" in skipped[0]


def test_missing_checksum_and_foreign_files_are_refused(tmp_path):
    _save_rounds(tmp_path, [1, 2])
    (tmp_path / "round_0002.pt.sha256").unlink()  # as if killed between the two writes
    assert latest_good_checkpoint(tmp_path)["round"] == 1
    assert latest_good_checkpoint(tmp_path, accept=lambda c, path: c["round"] > 5) is None
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a checkpoint")
    (tmp_path / "x.pt.sha256").write_text(hashlib.sha256(b"not a checkpoint").hexdigest())
    try:
        load_checkpoint(bogus)
        raise AssertionError("garbage was loaded")
    except CheckpointError as exc:
        assert "cannot be read" in str(exc)


class Evil:
    """Any non-tensor object: unpickling it could run code, so weights_only refuses it."""


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    save_checkpoint(path, {"obj": Evil()})
    try:
        load_checkpoint(path)
        raise AssertionError("an arbitrary pickle was loaded")
    except CheckpointError as exc:
        assert "cannot be read" in str(exc) and "Evil" in str(exc)


def test_remove_checkpoints(tmp_path):
    _save_rounds(tmp_path, [1, 2])
    save_checkpoint(tmp_path / "final.pt", {"round": 2})
    remove_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_exchange_files_round_trip_atomically_and_refuse_damage_and_pickles(tmp_path):
    path = save_exchange(tmp_path / "update.pt", {"w": torch.arange(5.0)})
    assert torch.equal(load_exchange(path)["w"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update.pt"]  # no temp file, no sidecar
    path.write_bytes(path.read_bytes()[:40])  # torn by a dying worker
    for bad, words in ((path, "cannot be read"), (tmp_path / "gone.pt", "is gone")):
        try:
            load_exchange(bad)
            raise AssertionError(f"{bad.name} was loaded")
        except CheckpointError as exc:
            assert words in str(exc) and bad.name in str(exc)
    save_exchange(path, {"obj": Evil()})
    try:
        load_exchange(path)
        raise AssertionError("an arbitrary pickle was loaded")
    except CheckpointError as exc:
        assert "Evil" in str(exc)


@pytest.mark.parametrize(
    "payload, says",
    [
        ({"weights": [1, 2]}, "'round' holds nothing"),
        ([1, 2, 3], "it holds a list, not a dict"),
        (_payload(2, model=[1]), "'model' holds a list, not a dict"),
        (_payload(2, model={"w": 3}), "model weight 'w' is not a tensor"),
        (_payload(2, round=-1), "'round' is -1"),
        (_payload(2, round=True), "'round' holds a bool"),
    ],
    ids=["another-dict", "a-list", "model-a-list", "weight-not-a-tensor", "negative-round", "bool-round"],
)
def test_a_checkpoint_that_passes_its_checksum_but_holds_something_else_is_refused(tmp_path, payload, says):
    _save_rounds(tmp_path, [1])
    save_checkpoint(round_checkpoint_path(tmp_path, 2), payload)  # its checksum matches what it holds
    with pytest.raises(CheckpointError, match="passes its checksum but is not a checkpoint this tool wrote") as err:
        load_checkpoint(round_checkpoint_path(tmp_path, 2))
    assert says in str(err.value)
    skipped = []
    assert latest_good_checkpoint(tmp_path, on_skip=skipped.append)["round"] == 1
    assert len(skipped) == 1 and "round_0002.pt" in skipped[0]


@pytest.mark.parametrize(
    "model, says",
    [
        ({"w": torch.zeros(8, 8)}, "model weight 'w' is torch.float32 (8, 8), the model's is torch.float32 (64,)"),
        ({"w": torch.zeros(64, dtype=torch.int64)}, "model weight 'w' is torch.int64 (64,)"),
        ({"w": torch.zeros(64), "v": torch.zeros(1)}, "model weight 'v' is not in the model"),
        ({}, "model weight 'w' is missing"),
    ],
)
def test_weights_of_another_shape_are_refused_against_the_model(tmp_path, model, says):
    reference = _payload(0)
    ckpt = _payload(2, model=model)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        check_layout("ckpt.pt", ckpt, reference)
    check_layout("ckpt.pt", _payload(2), reference)  # the same layout: accepted
    masks = {"masks": {"w": torch.ones(64, dtype=torch.bool)}}
    with pytest.raises(CheckpointError, match="server state 'masks' 'w' is torch.bool \\(3,\\)"):
        check_layout("ckpt.pt", _payload(2, server_state={"masks": {"w": torch.ones(3, dtype=torch.bool)}}),
                     _payload(0, server_state=masks))
