"""Stale Fast DDS shared-memory files: find them, and remove them only when provably unused.

A Fast DDS participant keeps its shared-memory segments, port files and their semaphores in
``/dev/shm`` (``fastdds_*``, ``sem.fastdds_*``) and removes them when it shuts down. A node
killed with SIGKILL cannot, and enough leftovers make later participants on the same ports
fail to exchange data over shared memory (seen here: ``m2vla soak``, which uses the
shared-memory large-data transport, found its graph silent until they were removed).

A file is *stale* when it is older than a grace period (a participant starting right now may
not have mapped its new segment yet), no running process we can see maps it or holds it open
(``/proc/*/maps`` and ``/proc/*/fd``), and its owner is provably gone:

- Fast DDS's own evidence: a segment or port ``X`` (and its ``sem.X_mutex``) has lock files that
  live users hold with ``flock``: ``X_el`` (exclusive, its one reader) and/or ``X_sl`` (shared,
  one per reader of a port several read). Locks we can take mean the users died; one we cannot
  means one lives. Locks are kernel state on the file, so this also sees processes /proc does
  not show (another container or PID namespace sharing /dev/shm, e.g. a second CI job):
  deleting their live port files would silently cut their shared-memory traffic.
- A family with no lock file at all is stale only when the caller vouches that every process
  that could use it is one of its own (``only_our_processes``: the test suite, whose ROS
  processes are its children); /proc alone cannot see other namespaces.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIXES = ("fastdds_", "sem.fastdds_", "fastrtps_", "sem.fastrtps_")
GRACE_S = 60.0


def _paths_in_use(proc: Path) -> set[str]:
    """Every file a process we can inspect maps or holds open."""
    used: set[str] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            with open(pid_dir / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6:
                        used.add(parts[5].strip().removesuffix(" (deleted)"))
            for fd in (pid_dir / "fd").iterdir():
                try:
                    used.add(os.readlink(fd))
                except OSError:
                    continue  # closed meanwhile
        except OSError:  # exited meanwhile, or hides what it maps (another user's, a sandbox's init)
            continue
    return used


def family_of(name: str) -> str:
    """The segment or port a Fast DDS file belongs to (``sem.fastdds_port7411_mutex`` -> ``fastdds_port7411``)."""
    family = name.removeprefix("sem.")
    for suffix in ("_el", "_sl", "_mutex"):
        family = family.removesuffix(suffix)
    return family


def lock_held(lock_file: Path) -> bool | None:
    """True when some process holds a flock on ``lock_file``, False when none does, None when absent."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # cannot ask: cannot prove the users gone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: someone holds it; anything else: cannot prove the users gone
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def users_alive(shm_dir: Path, family: str) -> bool | None:
    """Whether a live process holds one of the family's locks (``_el``, ``_sl``); None without lock files."""
    held = [lock_held(shm_dir / f"{family}{suffix}") for suffix in ("_el", "_sl")]
    if any(h is True for h in held):
        return True
    return False if any(h is False for h in held) else None


def stale_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), grace_s: float = GRACE_S,
                   now: float | None = None, only_our_processes: bool = False) -> list[Path]:
    """Fast DDS files in ``shm_dir`` whose users are provably gone (see the module docstring)."""
    if not shm_dir.is_dir() or not proc.is_dir():
        return []
    candidates = [p for p in shm_dir.iterdir() if p.name.startswith(PREFIXES) and p.is_file()]
    if not candidates:
        return []
    used = _paths_in_use(proc)
    alive = {family: users_alive(shm_dir, family) for family in {family_of(p.name) for p in candidates}}
    for path in candidates:  # a family one of whose files a visible process maps or holds is alive
        if str(path) in used:
            alive[family_of(path.name)] = True
    now = time.time() if now is None else now
    stale, unprovable = [], 0
    for path in candidates:
        try:
            old_enough = now - path.stat().st_mtime >= grace_s
        except FileNotFoundError:
            continue
        family_alive = alive[family_of(path.name)]
        if not old_enough or family_alive:
            continue
        if family_alive is None and not only_our_processes:
            unprovable += 1  # no lock to ask, and /proc cannot see other namespaces
            continue
        stale.append(path)
    if unprovable:
        log.info("kept %d Fast DDS files that have no lock file to prove them unused", unprovable)
    return sorted(stale)


def remove_stale_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), grace_s: float = GRACE_S,
                          only_our_processes: bool = False) -> list[Path]:
    """Remove what ``stale_segments`` finds, each checked again just before; returns the removed paths."""
    removed = []
    for path in stale_segments(shm_dir, proc, grace_s, only_our_processes=only_our_processes):
        try:
            if users_alive(shm_dir, family_of(path.name)) or time.time() - path.stat().st_mtime < grace_s:
                continue  # a participant took the port over (or recreated it) since the scan
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            log.warning("cannot remove stale Fast DDS file %s: %s", path, exc)
    if removed:
        log.info("removed %d stale Fast DDS shared-memory files from %s", len(removed), shm_dir)
    return removed
