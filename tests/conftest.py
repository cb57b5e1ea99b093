"""Shared fixtures: ROS environment for child processes and an isolated DDS domain per test."""

from __future__ import annotations

import os
import sys
import itertools
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_domain_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _no_stale_dds_shared_memory():
    """Fault tests SIGKILL nodes; their Fast DDS shared-memory files would outlive the run."""
    from m2vla_core.dds_shm import remove_stale_segments

    # only files whose Fast DDS locks prove their users gone: another job may share /dev/shm
    remove_stale_segments()
    yield
    remove_stale_segments(grace_s=5.0)  # this run's ROS processes have exited


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
