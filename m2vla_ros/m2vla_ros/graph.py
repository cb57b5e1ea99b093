"""The node graph of m2vla, written down once.

Both ``launch/bringup.launch.py`` (where ROS 2 launch is installed) and ``m2vla bringup``
(separate OS processes, for machines without launch) build their nodes from ``resolve()``,
so the two can never drift: same nodes, same executables, same parameter files, same
argument -> parameter mapping. This module imports no launch package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "m2vla_ros"
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Argument:
    name: str
    default: str
    description: str
    choices: tuple[str, ...] = ()


ARGUMENTS: tuple[Argument, ...] = (
    Argument("sim", "true", "Run the PyBullet sim node as the arm (false: a real arm via ros2_control).", ("true", "false")),
    Argument("policy", "", "Head checkpoint directory (config.json + model.safetensors); empty = the shipped embedded policy."),
    Argument("backbone", "", "VLM backbone: hub id or local directory; empty = the shipped tiny Qwen2-VL."),
    Argument("rviz", "true", "Start rviz2 with m2vla's config (only where rviz2 is installed).", ("true", "false")),
    Argument("device", "cpu", "Where the backbone and the head run.", ("cpu", "cuda")),
    Argument("backend", "onnxruntime", "Head runtime.", ("onnxruntime", "torch")),
    Argument("task", "reach_above", "Initial sim task (sim:=true only)."),
    Argument("camera_size", "", "[px] side of the sim camera's square frames (sim:=true only); empty = sim.yaml's "
                                "(448: the shipped policy's object localiser reads 448 px frames)."),
    Argument("controller_topic", "/joint_trajectory_controller/joint_trajectory",
             "ros2_control JointTrajectory topic of the real arm (sim:=false only)."),
)
ARGUMENTS_BY_NAME = {a.name: a for a in ARGUMENTS}


@dataclass(frozen=True)
class ResolvedNode:
    """One process of the graph, fully determined by the launch arguments."""

    name: str  # ROS node name
    executable: str  # console script in m2vla_ros (also the module m2vla_ros.<executable>)
    params_file: str  # file name under the package's config/ directory
    overrides: dict = field(default_factory=dict)  # parameter name -> value, applied after the file


def parse_arguments(argv: list[str]) -> dict[str, str]:
    """Parse launch-style ``name:=value`` words; unknown names and bad choices raise ValueError."""
    values = {a.name: a.default for a in ARGUMENTS}
    for word in argv:
        name, sep, value = word.partition(":=")
        if not sep:
            raise ValueError(f"argument {word!r} is not of the form name:=value")
        if name not in ARGUMENTS_BY_NAME:
            import difflib

            close = difflib.get_close_matches(name, ARGUMENTS_BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown launch argument {name!r}{hint}; known: {sorted(ARGUMENTS_BY_NAME)}")
        choices = ARGUMENTS_BY_NAME[name].choices
        if choices and value.lower() not in choices:
            raise ValueError(f"launch argument {name}:={value!r} must be one of {choices}")
        values[name] = value.lower() if choices else value
    if values["camera_size"]:
        _camera_size(values["camera_size"])
    return values


def _is_true(value: str) -> bool:
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _camera_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"camera_size:={value!r} must be a whole number of pixels") from None
    if not 8 <= size <= 2048:
        raise ValueError(f"camera_size:={size} must be within 8..2048 px")
    return size


def resolve(args: dict[str, str]) -> list[ResolvedNode]:
    """The nodes to start for these launch arguments (defaults filled in for missing ones)."""
    values = {a.name: a.default for a in ARGUMENTS}
    values.update(args)
    sim = _is_true(values["sim"])
    nodes = [
        ResolvedNode("m2vla_perception", "perception_node", "perception.yaml",
                     {"backbone": values["backbone"], "device": values["device"]}),
        ResolvedNode("m2vla_policy", "policy_node", "policy.yaml",
                     {"checkpoint": values["policy"], "backend": values["backend"], "device": values["device"]}),
        ResolvedNode("m2vla_controller", "controller_node", "controller.yaml",
                     {"output": "sim"} if sim else {"output": "joint_trajectory",
                                                    "trajectory_topic": values["controller_topic"]}),
    ]
    if sim:
        sim_overrides = {"task": values["task"]}
        if values["camera_size"]:
            size = _camera_size(values["camera_size"])
            sim_overrides.update(image_width=size, image_height=size)
        nodes.append(ResolvedNode("m2vla_sim", "sim_node", "sim.yaml", sim_overrides))
    return nodes


def config_dir() -> Path:
    """Installed config/ of m2vla_ros (the colcon install's share directory)."""
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / "config"


def rviz_config() -> Path:
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / "rviz" / "m2vla.rviz"
