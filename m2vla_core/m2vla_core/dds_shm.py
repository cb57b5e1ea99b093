"""Stale Fast DDS shared-memory files: find them, and remove them only when provably unused.

A Fast DDS participant keeps its shared-memory segments, port files and their semaphores in
``/dev/shm`` (``fastdds_*``, ``sem.fastdds_*``) and removes them when it shuts down. A node
killed with SIGKILL cannot, and enough leftovers make later participants on the same ports
fail to exchange data over shared memory (seen here: ``m2vla soak``, which uses the
shared-memory large-data transport, found its graph silent until they were removed).

A file is *stale* when no running process has it mapped or open (``/proc/*/maps`` and
``/proc/*/fd``) and it is older than a grace period (a participant starting right now may
not have mapped its new segment yet). If any process cannot be inspected (another user's,
without privileges; a sandbox's init) nothing is called stale, since we cannot prove the file
unused, unless the caller knows better (``ignore_uninspectable``: the test suite, whose ROS
processes are all its own children).
"""

from __future__ import annotations

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


def stale_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), grace_s: float = GRACE_S,
                   now: float | None = None, ignore_uninspectable: bool = False) -> list[Path]:
    """Fast DDS files in ``shm_dir`` that no process uses (empty when that cannot be proven)."""
    if not shm_dir.is_dir() or not proc.is_dir():
        return []
    candidates = [p for p in shm_dir.iterdir() if p.name.startswith(PREFIXES) and p.is_file()]
    if not candidates:
        return []
    used, complete = _paths_in_use(proc)
    if not complete and not ignore_uninspectable:
        log.info("not cleaning Fast DDS shared memory: some processes cannot be inspected")
        return []
    now = time.time() if now is None else now
    stale = []
    for path in candidates:
        try:
            old_enough = now - path.stat().st_mtime >= grace_s
        except FileNotFoundError:
            continue
        if old_enough and str(path) not in used:
            stale.append(path)
    return sorted(stale)


def remove_stale_segments(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), grace_s: float = GRACE_S,
                          ignore_uninspectable: bool = False) -> list[Path]:
    """Remove what ``stale_segments`` finds; returns the removed paths."""
    removed = []
    for path in stale_segments(shm_dir, proc, grace_s, ignore_uninspectable=ignore_uninspectable):
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
