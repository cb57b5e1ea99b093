"""The Panda's robot description for rviz, derived from pybullet_data's URDF.

pybullet_data's panda.urdf names its meshes ``package://meshes/...`` (no such ROS package), which rviz cannot resolve;
we rewrite them to absolute ``file://`` URIs so robot_state_publisher + rviz show the same
model the simulator uses.
"""

from __future__ import annotations

import re
from pathlib import Path

PANDA_URDF_RELATIVE = "franka_panda/panda.urdf"


def panda_urdf_path() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath()) / PANDA_URDF_RELATIVE


def panda_urdf_for_rviz() -> str:
    """URDF text with every mesh filename made an absolute file:// URI."""
    path = panda_urdf_path()
    base = path.parent

    def absolute(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("package://"):  # "package://meshes/..." means relative to the URDF here
            name = name[len("package://"):]
        elif "://" in name:
            return match.group(0)
        return f'filename="file://{(base / name).resolve()}"'

    return re.sub(r'filename="([^"]+)"', absolute, path.read_text(encoding="utf-8"))
