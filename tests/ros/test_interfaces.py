"""Our interfaces build, import, and a custom message crosses two OS processes over DDS intact."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

PEER = Path(__file__).with_name("roundtrip_peer.py")


def test_action_chunk_round_trips_between_two_processes_over_dds(ros_env, python):
    echo = subprocess.Popen([python, str(PEER), "echo", "40"], env=ros_env)
    try:
        client = subprocess.run(
            [python, str(PEER), "client", "30"], env=ros_env, capture_output=True, text=True, timeout=60
        )
    finally:
        echo.terminate()
        echo.wait(timeout=10)
    assert client.returncode == 0, client.stderr
    got = json.loads(client.stdout.strip().splitlines()[-1])
    assert got["names"] == [f"panda_joint{i}" for i in range(1, 8)] + ["gripper"]
    assert (got["horizon"], got["dim"]) == (3, 8)
    assert got["values"] == [0.25 * i - 1.5 for i in range(24)]  # exactly representable in float32
    assert got["sequence_id"] == 2**40 + 7
    assert got["stamp"] == [12, 345] and got["observation_stamp"] == [11, 0]
    assert got["frame_id"] == "panda_link0" and got["instruction_id"] == 42 and got["dt"] == 0.1


def test_every_interface_is_importable_and_carries_its_error_codes(ros_env, python):
    code = (
        "from m2vla_msgs.msg import ActionChunk, LayerFeatures, PolicyStatus, ControllerStatus, TaskStatus\n"
        "from m2vla_msgs.srv import LoadPolicy, Reset, Stop\n"
        "print(ActionChunk.ACTION_SPACE_EEF, PolicyStatus.STATE_REFUSED, ControllerStatus.STATE_ESTOP,"
        " LoadPolicy.Request.CONTRACT_MISMATCH, Reset.Request.UNKNOWN_TASK)\n"
    )
    out = subprocess.run([python, "-c", code], env=ros_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3", "2", "3", "1"]
