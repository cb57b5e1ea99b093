"""`m2vla doctor` and `m2vla env` tell a good install from a broken one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

M2VLA = [sys.executable, "-m", "m2vla_core.cli"]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH", "M2VLA_WS")}
    return env


def test_doctor_passes_on_the_project_install():
    out = subprocess.run([*M2VLA, "doctor"], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rmw_fastrtps_cpp" in out.stdout
    assert "m2vla_msgs/ActionChunk" in out.stdout and "m2vla_msgs/LoadPolicy" in out.stdout


def test_doctor_fails_clearly_when_the_interfaces_are_missing(tmp_path: Path):
    env = _clean_env()
    env["M2VLA_WS"] = str(tmp_path / "empty_ws")  # a workspace with nothing built
    out = subprocess.run([*M2VLA, "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "m2vla_msgs" in out.stderr and "make setup" in out.stderr


def test_env_exports_let_a_plain_python_import_our_interfaces():
    exports = subprocess.run([*M2VLA, "env"], env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert exports.returncode == 0, exports.stderr
    script = exports.stdout + f'\n"{sys.executable}" -c "import rclpy; from m2vla_msgs.msg import LayerFeatures; print(\'ok\')"\n'
    out = subprocess.run(["bash", "-c", script], env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_env_refuses_when_the_workspace_is_not_built(tmp_path: Path):
    env = _clean_env()
    env["M2VLA_WS"] = str(tmp_path)
    out = subprocess.run([*M2VLA, "env"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "make setup" in out.stderr
