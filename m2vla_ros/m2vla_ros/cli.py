"""ROS subcommands of ``m2vla`` (run in a child with the ROS environment by m2vla_core.rosenv)."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "bringup": "m2vla_ros.bringup:main",
    "demo": "m2vla_ros.demo:main",
    "soak": "m2vla_ros.soak:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: m2vla {{{','.join(SUBCOMMANDS)}}} [args]", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
