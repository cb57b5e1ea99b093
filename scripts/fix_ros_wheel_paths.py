"""Rewrite the build-machine paths baked into the ROS 2 PyPI wheels' CMake exports.

The wheels were built under /opt/python/cp311-cp311; their exported CMake files name that
Python include dir and numpy include dir, so building our interfaces against them fails.
We substitute this interpreter's real paths. Idempotent: files without the old paths are
left untouched.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy

OLD_PREFIX = "/opt/python/cp311-cp311"
REPLACEMENTS = {
    f"{OLD_PREFIX}/include/python3.11": sysconfig.get_paths()["include"],
    f"{OLD_PREFIX}/lib/python3.11/site-packages/numpy/_core/include": numpy.get_include(),
}


def main(venv: Path) -> int:
    share = venv / "share"
    changed = 0
    for path in share.rglob("*.cmake"):
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if OLD_PREFIX not in text:
            continue
        new = text
        for old, real in REPLACEMENTS.items():
            new = new.replace(old, real)
        if new != text:
            path.write_text(new, encoding="utf-8", errors="surrogateescape")
            changed += 1
    if changed:
        print(f"[setup] fixed build-machine paths in {changed} CMake files under {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else sys.prefix)))
