"""``m2vla doctor``: what is installed, which rmw, whether our interfaces import, GPU or not.

Exits non-zero with a message that says what to do when something required is missing.
The ROS half runs in a child process (``m2vla_ros.doctor``) with the environment from
``m2vla_core.rosenv``; this module itself never imports ROS.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import subprocess
import sys

from m2vla_core import rosenv

REQUIRED = ("torch", "transformers", "numpy", "safetensors", "onnx", "onnxruntime", "pybullet", "cv2")


def _version(module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(module_name)
        except importlib.metadata.PackageNotFoundError:
            version = "installed"
    return str(version)


def _ros_probe() -> dict:
    """Run the ROS probe in a child with the ROS environment; parse its one JSON line."""
    proc = subprocess.run(
        [sys.executable, "-m", "m2vla_ros.doctor"],
        env=rosenv.ros_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if "No module named m2vla_ros" in detail:
        return {"ok": False, "error": f"m2vla_msgs / m2vla_ros are not built in {rosenv.workspace_install()}: run `make setup`"}
    return {"ok": False, "error": f"ROS probe failed: {detail}"}


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    report: dict = {"python": platform.python_version(), "packages": {}, "problems": []}
    for name in REQUIRED:
        version = _version(name)
        report["packages"][name] = version
        if version is None:
            report["problems"].append(f"Python package {name!r} is missing: run `make setup`")
    import torch  # imported after the check so a missing torch is reported, not raised

    report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        report["onnxruntime_providers"] = []
    report["workspace"] = str(rosenv.workspace_install())
    ros = _ros_probe()
    report["ros"] = ros
    if not ros.get("ok"):
        report["problems"].append(ros.get("error", "ROS probe failed"))

    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"python        {report['python']}")
        for name, version in report["packages"].items():
            print(f"{name:<13} {version or 'MISSING'}")
        print(f"gpu           {report['gpu'] or 'none (CPU only)'}")
        print(f"onnxruntime   providers {', '.join(report['onnxruntime_providers']) or 'none'}")
        print(f"workspace     {report['workspace']}")
        print(f"ros distro    {ros.get('distro', '?')}")
        print(f"rmw           {ros.get('rmw', '?')}")
        print(f"interfaces    {', '.join(ros.get('interfaces', [])) or 'NOT IMPORTABLE'}")
        print(f"m2vla_ros     {ros.get('m2vla_ros', 'NOT IMPORTABLE')}")
    if report["problems"]:
        for problem in report["problems"]:
            print(f"doctor: PROBLEM: {problem}", file=sys.stderr)
        return 1
    print("doctor: all good")
    return 0
