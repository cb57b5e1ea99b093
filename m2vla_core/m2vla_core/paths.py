"""Checks on output paths, made before the work whose result would land there."""

from __future__ import annotations

import os
from pathlib import Path


def check_destination(path: str | os.PathLike, flag: str, *, directory: bool, hint: str = "") -> None:
    """Refuse an output that could not be written once the work is done: a directory given for
    a file (or a file for a directory), or a path under a regular file. ValueError naming the
    flag and the path; ``hint`` is appended to the wrong-kind message."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        got, want = ("a directory", "a file path") if p.is_dir() else ("a file", "a directory")
        raise ValueError(f"{flag} {path} is {got}; give {want}{hint}")
    for parent in p.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            break
