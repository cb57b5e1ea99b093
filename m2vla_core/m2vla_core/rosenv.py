"""Environment for ROS 2 child processes, computed without importing ROS.

The ROS 2 PyPI wheels need their shared libraries on LD_LIBRARY_PATH *before* the
interpreter starts, and our interfaces live in the colcon install of ``ros2_ws``. Users
should never export these by hand: ``m2vla`` ROS subcommands run in a child process with
this environment, and ``m2vla env`` prints it as shell exports for any plain rclpy program.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

WS_ENV_VAR = "M2VLA_WS"  # override the colcon workspace (e.g. in a Docker image)
DEFAULT_RMW = "rmw_fastrtps_cpp"


def project_root() -> Path:
    """The repository root when m2vla_core is installed from a checkout (editable)."""
    return Path(__file__).resolve().parents[2]


def workspace_install() -> Path:
    """The colcon install prefix holding m2vla_msgs and m2vla_ros."""
    ws = os.environ.get(WS_ENV_VAR)
    return (Path(ws) if ws else project_root() / "ros2_ws") / "install"


def _join(*parts: str | os.PathLike | None) -> str:
    seen: list[str] = []
    for part in parts:
        for item in str(part or "").split(os.pathsep):
            if item and item not in seen:
                seen.append(item)
    return os.pathsep.join(seen)


def ros_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default os.environ) extended so rclpy and m2vla_msgs import."""
    env = dict(os.environ if base is None else base)
    install = workspace_install()
    prefix = Path(sys.prefix)
    site = Path(sysconfig.get_paths()["purelib"])
    py_dir = f"python{sys.version_info.major}.{sys.version_info.minor}"
    wheel_libs = sorted(str(p) for p in site.glob("ros_*.libs") if p.is_dir())
    env["LD_LIBRARY_PATH"] = _join(install / "lib", prefix / "lib", *wheel_libs, env.get("LD_LIBRARY_PATH"))
    env["PYTHONPATH"] = _join(install / "lib" / py_dir / "site-packages", env.get("PYTHONPATH"))
    env["AMENT_PREFIX_PATH"] = _join(install, prefix, env.get("AMENT_PREFIX_PATH"))
    env["PATH"] = _join(prefix / "bin", env.get("PATH"))
    env.setdefault("RMW_IMPLEMENTATION", DEFAULT_RMW)
    # The wheels' bootstrapper re-executes Python to set LD_LIBRARY_PATH; we already did.
    env["_ROS_WHEELS_BOOTSTRAP_COMPLETE"] = "1"
    return env


EXPORTED_KEYS = ("LD_LIBRARY_PATH", "PYTHONPATH", "AMENT_PREFIX_PATH", "PATH", "RMW_IMPLEMENTATION",
                 "_ROS_WHEELS_BOOTSTRAP_COMPLETE")


def env_main(argv: list[str]) -> int:
    """``m2vla env``: print ``export`` lines; use as ``eval "$(.venv/bin/m2vla env)"``."""
    if argv and argv[0] in ("-h", "--help"):
        print('usage: eval "$(m2vla env)"  — exports so plain rclpy programs join the m2vla graph')
        return 0
    if not (workspace_install() / "share" / "m2vla_msgs").is_dir():
        print(f"m2vla env: interfaces not built under {workspace_install()}; run `make setup`", file=sys.stderr)
        return 1
    env = ros_environment()
    for key in EXPORTED_KEYS:
        print(f"export {key}={shlex.quote(env[key])}")
    return 0


def run_ros_module(module: str, argv: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run ``python -m module argv`` in the ROS environment, forwarding SIGINT/SIGTERM."""
    child = subprocess.Popen([sys.executable, "-m", module, *argv], env=env or ros_environment())

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ros_subcommand(name: str, argv: list[str]) -> int:
    """Dispatch a ROS subcommand (bringup, demo, soak, ...) to ``m2vla_ros.cli`` in a child."""
    return run_ros_module("m2vla_ros.cli", [name, *argv])
