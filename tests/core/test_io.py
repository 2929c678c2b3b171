"""Atomic writes: the whole file or the old one, never a half file; readable by other users."""

from __future__ import annotations

import os
import stat

import pytest

from fedmef_core.io import atomic_path, write_json, write_text


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
