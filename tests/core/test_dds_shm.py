"""Stale Fast DDS shared-memory files are removed only when no process uses them."""

from __future__ import annotations

import fcntl
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


def test_a_held_owner_lock_keeps_its_family_even_when_proc_does_not_show_the_owner(tmp_path):
    """Another container sharing /dev/shm: its processes are not in our /proc, but their flocks are."""
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    (proc / "4242" / "maps").mkdir(parents=True)  # and one process we cannot inspect
    (proc / "4242" / "fd").mkdir()
    live = ["fastdds_port7500", "fastdds_port7500_el", "sem.fastdds_port7500_mutex"]
    dead = ["fastdds_1234abcd", "fastdds_1234abcd_el"]  # its owner lock is free: the owner died
    for name in live + dead:
        _make(shm / name, age_s=600)
    owner = os.open(shm / "fastdds_port7500_el", os.O_RDONLY)
    try:
        fcntl.flock(owner, fcntl.LOCK_EX)  # what a live Fast DDS participant holds on its port
        assert [p.name for p in stale_segments(shm, proc=proc, grace_s=60)] == dead
        assert sorted(p.name for p in remove_stale_segments(shm, proc=proc, grace_s=60)) == dead
        assert sorted(p.name for p in shm.iterdir()) == sorted(live)
    finally:
        os.close(owner)
    assert sorted(p.name for p in remove_stale_segments(shm, proc=proc, grace_s=60)) == sorted(live)
