"""Stale Fast DDS shared-memory files are removed only when their users are provably gone."""

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


def _nobody(tmp_path):
    """A /proc that shows no process: what another container's processes look like from here."""
    proc = tmp_path / "proc"
    proc.mkdir()
    return proc


def test_an_old_file_with_a_free_lock_is_stale_but_a_mapped_open_or_fresh_one_is_not(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    dead = ["fastdds_port7411", "fastdds_port7411_el", "sem.fastdds_port7411_mutex"]  # a killed node's port
    for name in dead:
        _make(shm / name, age_s=600)
    _make(shm / "fastdds_mapped_segment", age_s=600)
    _make(shm / "fastdds_mapped_segment_el", age_s=600)
    _make(shm / "fastdds_just_created", age_s=0)  # its participant may not have locked it yet
    _make(shm / "fastdds_just_created_el", age_s=0)
    _make(shm / "someone_elses_file", age_s=600)  # not Fast DDS: never touched
    with open(shm / "fastdds_mapped_segment", "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 4096)  # this process (visible in /proc) maps it
        try:
            assert [p.name for p in stale_segments(shm, grace_s=60)] == sorted(dead)
            removed = remove_stale_segments(shm, grace_s=60)
        finally:
            mapped.close()
    assert sorted(p.name for p in removed) == sorted(dead)
    assert sorted(p.name for p in shm.iterdir()) == [
        "fastdds_just_created", "fastdds_just_created_el", "fastdds_mapped_segment", "fastdds_mapped_segment_el",
        "someone_elses_file"]


def test_a_held_exclusive_or_shared_lock_keeps_its_family_even_when_proc_does_not_show_the_owner(tmp_path):
    shm, proc = tmp_path / "shm", _nobody(tmp_path)
    shm.mkdir()
    one_reader = ["fastdds_port7500", "fastdds_port7500_el", "sem.fastdds_port7500_mutex"]
    many_readers = ["fastdds_port7600", "fastdds_port7600_sl", "sem.fastdds_port7600_mutex"]
    dead = ["fastdds_1234abcd", "fastdds_1234abcd_el"]  # its lock is free: the owner died
    for name in one_reader + many_readers + dead:
        _make(shm / name, age_s=600)
    owner, reader = os.open(shm / "fastdds_port7500_el", os.O_RDONLY), os.open(shm / "fastdds_port7600_sl", os.O_RDONLY)
    try:
        fcntl.flock(owner, fcntl.LOCK_EX)  # what a live participant holds on its port
        fcntl.flock(reader, fcntl.LOCK_SH)  # what each live reader of a shared port holds
        assert [p.name for p in stale_segments(shm, proc=proc, grace_s=60)] == dead
        assert sorted(p.name for p in remove_stale_segments(shm, proc=proc, grace_s=60)) == dead
        assert sorted(p.name for p in shm.iterdir()) == sorted(one_reader + many_readers)
    finally:
        os.close(owner)
        os.close(reader)
    assert sorted(p.name for p in remove_stale_segments(shm, proc=proc, grace_s=60)) == sorted(
        one_reader + many_readers)


def test_a_family_without_any_lock_file_is_kept_unless_the_caller_vouches_for_every_user(tmp_path):
    shm, proc = tmp_path / "shm", _nobody(tmp_path)
    shm.mkdir()
    _make(shm / "fastdds_port7411", age_s=600)
    _make(shm / "sem.fastdds_port7411_mutex", age_s=600)
    assert stale_segments(shm, proc=proc, grace_s=60) == []  # /proc cannot see other namespaces
    assert remove_stale_segments(shm, proc=proc, grace_s=60) == []
    assert [p.name for p in stale_segments(shm, proc=proc, grace_s=60, only_our_processes=True)] == [
        "fastdds_port7411", "sem.fastdds_port7411_mutex"]
