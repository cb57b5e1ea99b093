"""The single ``m2vla`` command line.

Subcommands are looked up lazily in ``COMMANDS`` (name -> "module:function"), so
``m2vla --help`` is instant and a broken optional part never breaks the others. Each target
takes ``argv: list[str]`` and returns an exit code; an OSError a subcommand lets through (a
file given where a directory belongs, or the reverse) ends as one line on stderr and exit code
2, like every other refused input. ROS subcommands live in ``m2vla_ros``
and run in a child process whose environment ``m2vla_core.rosenv`` prepares, because the
ROS libraries must be on LD_LIBRARY_PATH before the interpreter starts and this package
never imports ROS itself.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("m2vla_core.doctor:main", "check the install: packages, rmw, interfaces, GPU"),
    "env": ("m2vla_core.rosenv:env_main", "print shell exports for plain rclpy programs"),
    "make-tiny-vlm": ("m2vla_core.backbone.tiny:cli_main", "build a tiny random-weight VLM offline"),
    "features": ("m2vla_core.backbone.cli:features_main", "precompute layer features of a dataset"),
    "train": ("m2vla_core.training.cli:train_main", "train a head on cached features"),
    "export": ("m2vla_core.export.cli:export_main", "export a head to ONNX and verify parity"),
    "record": ("m2vla_core.sim.record:cli_main", "record scripted demonstrations (LeRobot format)"),
    "eval": ("m2vla_core.evaluation.cli:eval_main", "closed-loop evaluation in the PyBullet suite"),
    "ablate": ("m2vla_core.evaluation.ablate:cli_main", "train + evaluate the ablation variants"),
    "probe": ("m2vla_core.evaluation.probe:main", "can a backbone's features locate the cubes? (before training)"),
    "localiser": ("m2vla_core.training.localiser:main", "fit the object localiser a privileged-state head reads"),
    "bench": ("m2vla_core.bench.cli:bench_main", "benchmarks: head, backbone, text actions, ..."),
    "pack": ("m2vla_core.packs.cli:pack_main", "skill packs: train per task family, combine with a router, eval"),
    "text-baseline": ("m2vla_core.baselines.cli:text_baseline_main", "VLM2VLA-style actions-as-text LoRA baseline"),
    "bringup": ("m2vla_core.rosenv:ros_subcommand:bringup", "start the ROS node graph (no ros2 launch needed)"),
    "demo": ("m2vla_core.rosenv:ros_subcommand:demo", "headless sim demo through the real ROS graph"),
    "soak": ("m2vla_core.rosenv:ros_subcommand:soak", "load / soak test of the running graph"),
}


def _usage() -> str:
    lines = ["usage: m2vla <command> [args...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"m2vla: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module_name, func_name, *bound = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(*bound, rest) or 0)
    except OSError as exc:  # a file where a directory belongs (or the reverse), a full disk: input, not a bug
        print(f"m2vla {name}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
