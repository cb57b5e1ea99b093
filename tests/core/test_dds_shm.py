"""Stale Fast DDS shared-memory files are removed only when no process uses them."""

from __future__ import annotations

import mmap
import os
import time

from m2vla_core.dds_shm import remove_stale_segments, stale_segments


def _make(path, age_s: float) -> None:
    path.write_bytes(b"\0" * 4096)
    past = time.time() - age_s
    os.utime(path, (past, past))


def test_an_old_unused_fastdds_file_is_stale_but_a_mapped_open_or_fresh_one_is_not(tmp_path):
    _make(tmp_path / "fastdds_port7411", age_s=600)  # left behind by a killed node
    _make(tmp_path / "sem.fastdds_port7411_mutex", age_s=600)
    _make(tmp_path / "fastdds_mapped_segment", age_s=600)
    _make(tmp_path / "fastdds_open_lock_el", age_s=600)
    _make(tmp_path / "fastdds_just_created", age_s=0)  # its participant may not have mapped it yet
    _make(tmp_path / "someone_elses_file", age_s=600)  # not Fast DDS: never touched
    with open(tmp_path / "fastdds_mapped_segment", "r+b") as f, open(tmp_path / "fastdds_open_lock_el", "rb"):
        mapped = mmap.mmap(f.fileno(), 4096)  # this process (a live participant) maps it
        try:
            stale = stale_segments(tmp_path, grace_s=60, ignore_uninspectable=True)
            assert [p.name for p in stale] == ["fastdds_port7411", "sem.fastdds_port7411_mutex"]
            removed = remove_stale_segments(tmp_path, grace_s=60, ignore_uninspectable=True)
        finally:
            mapped.close()
    assert sorted(p.name for p in removed) == ["fastdds_port7411", "sem.fastdds_port7411_mutex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fastdds_just_created", "fastdds_mapped_segment", "fastdds_open_lock_el", "someone_elses_file"]


def test_nothing_is_called_stale_when_a_process_cannot_be_inspected_unless_the_caller_says_so(tmp_path):
    _make(tmp_path / "fastdds_port7411", age_s=600)
    proc = tmp_path / "proc"
    (proc / "4242" / "maps").mkdir(parents=True)  # unreadable as a file: what it maps is unknown
    (proc / "4242" / "fd").mkdir()
    assert stale_segments(tmp_path, proc=proc, grace_s=60) == []
    assert remove_stale_segments(tmp_path, proc=proc, grace_s=60) == []
    assert (tmp_path / "fastdds_port7411").exists()
    assert [p.name for p in stale_segments(tmp_path, proc=proc, grace_s=60, ignore_uninspectable=True)] == [
        "fastdds_port7411"]
