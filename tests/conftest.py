"""Shared fixtures: ROS environment for child processes and an isolated DDS domain per test."""

from __future__ import annotations

import os
import sys
import itertools
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_domain_counter = itertools.count()


@pytest.fixture
def ros_domain_id() -> int:
    """A DDS domain unlikely to be used by any other test run on this machine (1..101)."""
    return 1 + (os.getpid() * 7 + next(_domain_counter)) % 101


@pytest.fixture
def ros_env(ros_domain_id: int) -> dict[str, str]:
    """Environment for a child process that imports rclpy + m2vla_msgs, on its own domain."""
    from m2vla_core.rosenv import ros_environment

    env = ros_environment()
    env["ROS_DOMAIN_ID"] = str(ros_domain_id)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
