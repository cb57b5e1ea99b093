"""ROS half of ``m2vla doctor``: prints one JSON line describing the ROS install.

Runs in a child process started by ``m2vla_core.doctor`` with the ROS environment. It does
not need m2vla_ros to be built: run as a file or module, its only imports are rclpy and the
interfaces it checks.
"""

from __future__ import annotations

import json
import os
import sys

INTERFACES = (
    "m2vla_msgs.msg:ActionChunk",
    "m2vla_msgs.msg:LayerFeatures",
    "m2vla_msgs.msg:PolicyStatus",
    "m2vla_msgs.msg:ControllerStatus",
    "m2vla_msgs.msg:TaskStatus",
    "m2vla_msgs.msg:FeatureContract",
    "m2vla_msgs.srv:LoadPolicy",
    "m2vla_msgs.srv:Reset",
    "m2vla_msgs.srv:Stop",
)


def probe() -> dict:
    result: dict = {"ok": True, "interfaces": []}
    try:
        import rclpy
        from rclpy.utilities import get_rmw_implementation_identifier
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"rclpy does not import ({exc}); run `make setup`"}
    result["distro"] = os.environ.get("ROS_DISTRO", "kilted (PyPI wheels)")
    try:
        result["rmw"] = get_rmw_implementation_identifier()
    except Exception as exc:  # noqa: BLE001
        result["rmw"] = f"unknown ({exc})"
    missing = []
    for spec in INTERFACES:
        module_name, type_name = spec.split(":")
        try:
            module = __import__(module_name, fromlist=[type_name])
            interface = getattr(module, type_name)
            (interface.Request if hasattr(interface, "Request") else interface)()
            result["interfaces"].append(f"{module_name.split('.')[0]}/{type_name}")
        except Exception as exc:  # noqa: BLE001
            missing.append(f"{spec} ({type(exc).__name__}: {exc})")
    if missing:
        result["ok"] = False
        result["error"] = (
            "m2vla_msgs interfaces are missing or broken: " + "; ".join(missing)
            + " — build them with `make setup` (colcon build in ros2_ws)"
        )
    try:
        import m2vla_ros

        result["m2vla_ros"] = os.path.dirname(m2vla_ros.__file__)
    except Exception as exc:  # noqa: BLE001
        result["ok"] = False
        result["error"] = result.get("error", "") + f" m2vla_ros not importable ({exc}); run `make setup`"
    del rclpy
    return result


if __name__ == "__main__":
    print(json.dumps(probe()))
    sys.exit(0)
