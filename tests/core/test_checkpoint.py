import hashlib

import torch

from fedmef_core.checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    load_checkpoint,
    load_exchange,
    remove_checkpoints,
    round_checkpoint_path,
    round_checkpoints,
    save_checkpoint,
    save_exchange,
)


def _save_rounds(tmp_path, rounds):
    for r in rounds:
        save_checkpoint(round_checkpoint_path(tmp_path, r), {"round": r, "w": torch.full((64,), float(r))})


def test_roundtrip_and_listing(tmp_path):
    _save_rounds(tmp_path, [1, 2, 10])
    assert [r for r, _ in round_checkpoints(tmp_path)] == [1, 2, 10]
    ckpt = load_checkpoint(round_checkpoint_path(tmp_path, 2))
    assert ckpt["round"] == 2 and torch.equal(ckpt["w"], torch.full((64,), 2.0))
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
    assert latest_good_checkpoint(tmp_path, accept=lambda c: c["round"] > 5) is None
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
