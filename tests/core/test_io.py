"""Atomic writes: the whole file or the old one, never a half file; readable by other users."""

from __future__ import annotations

import os
import stat

import pytest

from fedmef_core.io import DiskFull, atomic_path, write_bytes, write_json, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)], ids=["022", "027", "002"])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask, mask, mode):
    umask(mask)
    write_json(tmp_path / "out" / "metrics.json", {"a": 1})
    with atomic_path(tmp_path / "plot.png") as tmp:  # the path-yielding form (plots, torch.save) too
        tmp.write_bytes(b"png")
    for path in (tmp_path / "out" / "metrics.json", tmp_path / "plot.png"):
        assert stat.S_IMODE(path.stat().st_mode) == mode


def test_overwrite_replaces_the_whole_file_and_leaves_no_temp(tmp_path):
    write_text(tmp_path / "a.txt", "first version, longer\n")
    write_text(tmp_path / "a.txt", "second\n")
    assert (tmp_path / "a.txt").read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    write_text(tmp_path / "a.txt", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "a.txt").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_full_disk_is_one_message_and_keeps_the_old_file_and_no_temp_file(small_disk):
    disk = small_disk(1)  # a real 1 MB tmpfs
    write_bytes(disk / "kept.bin", b"old")
    with pytest.raises(DiskFull) as err:
        write_bytes(disk / "kept.bin", b"x" * 2_000_000)
    assert str(err.value).startswith(f"cannot write {disk / 'kept.bin'}: no space left on device; free some space")
    assert (disk / "kept.bin").read_bytes() == b"old" and sorted(p.name for p in disk.iterdir()) == ["kept.bin"]
    with pytest.raises(DiskFull), atomic_path(disk / "plot.png") as tmp:  # the path-yielding form too
        tmp.write_bytes(b"x" * 2_000_000)
    assert sorted(p.name for p in disk.iterdir()) == ["kept.bin"]


def test_a_full_disk_under_torch_save_is_the_same_message(small_disk):
    """torch.save does not pass ENOSPC on (``RuntimeError: ... unexpected pos``): the exchange files of a round
    go through it."""
    import torch

    from fedmef_core.checkpoint import save_exchange

    disk = small_disk(1)
    with pytest.raises(DiskFull, match=f"cannot write {disk / 'update.pt'}: no space left on device"):
        save_exchange(disk / "update.pt", {"w": torch.zeros(1_000_000)})
    assert list(disk.iterdir()) == []
    with pytest.raises(RuntimeError, match="not a disk problem"), atomic_path(disk / "x.bin"):
        raise RuntimeError("not a disk problem")  # other failures stay what they are
