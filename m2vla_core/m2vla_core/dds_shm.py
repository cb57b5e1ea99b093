"""Stale Fast DDS shared-memory files: find them, and remove them only when provably unused.

A Fast DDS participant keeps its shared-memory segments, port files and their semaphores in
``/dev/shm`` (``fastdds_*``, ``sem.fastdds_*``) and removes them when it shuts down. A node
killed with SIGKILL cannot, and enough leftovers make later participants on the same ports
fail to exchange data over shared memory (seen here: ``m2vla soak``, which uses the
shared-memory large-data transport, found its graph silent until they were removed).

A file is *stale* when it is older than a grace period (a participant starting right now may
not have mapped its new segment yet), no running process we can see maps it or holds it open
(``/proc/*/maps`` and ``/proc/*/fd``), and its owner is provably gone:

- Fast DDS's own evidence first: a segment or port ``X`` (and its ``sem.X_mutex``) has an
  owner lock file ``X_el`` that the live owner holds with ``flock``. A lock we can take means
  the owner died; one we cannot means it lives. Locks are kernel state on the file, so this
  also sees processes /proc does not show (another container or PID namespace sharing
  /dev/shm, e.g. a second CI job): deleting their live port files would silently cut their
  shared-memory traffic.
- A file with no owner lock file is stale only if every process could be inspected (another
  user's, without privileges, or a sandbox's init hide what they map), unless the caller
  knows better (``ignore_uninspectable``: the test suite, whose ROS processes are its children).
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


def _paths_in_use(proc: Path) -> tuple[set[str], bool]:
    """Every file any process maps or holds open, and whether every process could be read."""
    used: set[str] = set()
    complete = True
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
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process exited meanwhile
        except OSError:  # PermissionError, or anything else that hides what it maps
            complete = False
    return used, complete


def owner_of(name: str) -> str:
    """Name of the owner lock file of a Fast DDS shared-memory file (``fastdds_port7411_el``)."""
    family = name.removeprefix("sem.")
    for suffix in ("_el", "_sl", "_mutex"):
        family = family.removesuffix(suffix)
    return f"{family}_el"


def owner_alive(lock_file: Path) -> bool | None:
    """True when some process holds ``lock_file``'s flock, False when it is free, None when absent."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def stale_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), grace_s: float = GRACE_S,
                   now: float | None = None, ignore_uninspectable: bool = False) -> list[Path]:
    """Fast DDS files in ``shm_dir`` that no process uses (empty when that cannot be proven)."""
    if not shm_dir.is_dir() or not proc.is_dir():
        return []
    candidates = [p for p in shm_dir.iterdir() if p.name.startswith(PREFIXES) and p.is_file()]
    if not candidates:
        return []
    used, complete = _paths_in_use(proc)
    owners = {name: owner_alive(shm_dir / name) for name in {owner_of(p.name) for p in candidates}}
    now = time.time() if now is None else now
    stale, unprovable = [], 0
    for path in candidates:
        try:
            old_enough = now - path.stat().st_mtime >= grace_s
        except FileNotFoundError:
            continue
        alive = owners[owner_of(path.name)]
        if not old_enough or str(path) in used or alive:
            continue
        if alive is None and not complete and not ignore_uninspectable:
            unprovable += 1  # no owner lock to ask, and some process hides what it maps
            continue
        stale.append(path)
    if unprovable:
        log.info("kept %d Fast DDS files without an owner lock: some processes cannot be inspected", unprovable)
    return sorted(stale)


def remove_stale_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), grace_s: float = GRACE_S,
                          ignore_uninspectable: bool = False) -> list[Path]:
    """Remove what ``stale_segments`` finds; returns the removed paths."""
    removed = []
    for path in stale_segments(shm_dir, proc, grace_s, ignore_uninspectable=ignore_uninspectable):
        if owner_alive(shm_dir / owner_of(path.name)):
            continue  # a participant took the port over since it was found stale
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            log.warning("cannot remove stale Fast DDS file %s: %s", path, exc)
    if removed:
        log.info("removed %d stale Fast DDS shared-memory files from %s", len(removed), shm_dir)
    return removed
