"""Faults with real processes: a node killed (SIGKILL) or frozen mid-episode, then back.

Whatever dies, the arm holds where it is (the command stream keeps going and stops changing),
the reason is reported, and when the node is back motion resumes from the current state
without a jump. Each test leaves the graph whole again for the next one.
"""

from __future__ import annotations

import signal
import time

import numpy as np
from safety_support import TEST_FRAME, assert_no_jump
from sensor_msgs.msg import JointState

from m2vla_core.control import PANDA_JOINT_NAMES
from m2vla_msgs.msg import ControllerStatus, PolicyStatus
from m2vla_msgs.srv import Stop
from m2vla_ros import qos

# policy.yaml max_feature_age_s 0.5 + controller.yaml chunk_timeout_s 1.5 after the last chunk (a
# 0.4 s policy tick): the arm holds after at most ~2 s (+ DDS); the assertions look after that.
HOLD_AFTER_S = 3.0
OBSERVE_S = 1.5
RESTART_TIMEOUT_S = 120.0  # a fresh perception imports torch + transformers and loads the VLM


def _moving(stack, instruction: str = "pick up the red cube") -> None:
    t = stack.publish_instruction(instruction)
    stack.wait_for_motion(t, chunks=3)


def _held(client, since_stamp: float) -> np.ndarray:
    """The one position commanded since ``since_stamp`` (ROS clock): the controller must hold."""
    held = client.commands_stamped_after(since_stamp)
    assert len(held) > 100, (f"only {len(held)} commands while holding: the controller must keep streaming "
                             f"({client.describe_commands(since_stamp)})")
    assert np.ptp(held, axis=0).max() < 1e-9, f"commands changed while holding: ptp {np.ptp(held, axis=0)}"
    return held[-1]


def test_perception_killed_mid_episode_stops_the_policy_the_arm_holds_and_a_restart_resumes_without_a_jump(stack):
    client = stack.client
    _moving(stack)
    kill_stamp = client.now_stamp()
    stack.kill("m2vla_perception")
    time.sleep(HOLD_AFTER_S + OBSERVE_S)
    assert client.chunks_computed_after(kill_stamp + 1.0) == 0, "chunks kept coming without fresh features"
    held = _held(client, kill_stamp + HOLD_AFTER_S)
    status = client.latest("policy_status")
    assert status.state == PolicyStatus.STATE_WAITING and "old" in status.message, status.message
    assert client.latest("controller_status").hold_reason == "stale_chunk"

    t_restart = time.monotonic()
    stack.restart("m2vla_perception")  # gets the latched instruction and feature contract again
    stack.wait_for_motion(t_restart, chunks=3, timeout_s=RESTART_TIMEOUT_S)
    time.sleep(0.5)
    resumed = client.commands_since(t_restart, stamped=True)
    np.testing.assert_allclose(resumed[0, 1:], held, atol=1e-9, err_msg="motion did not resume from the held state")
    assert_no_jump(resumed)


def test_policy_killed_mid_chunk_the_controller_stops_the_chunk_and_holds(stack):
    client = stack.client
    _moving(stack)
    t_kill, kill_stamp = time.monotonic(), client.now_stamp()
    stack.kill("m2vla_policy")
    time.sleep(HOLD_AFTER_S + OBSERVE_S)
    _held(client, kill_stamp + HOLD_AFTER_S)
    assert_no_jump(client.commands_since(t_kill - 0.5, stamped=True))  # finishing / stopping the chunk is smooth
    assert client.latest("controller_status").hold_reason in ("stale_chunk", "chunk_finished")

    t_restart = time.monotonic()
    stack.restart("m2vla_policy")
    stack.wait_for_motion(t_restart, chunks=3, timeout_s=RESTART_TIMEOUT_S)
    assert_no_jump(client.commands_since(t_restart, stamped=True))


def test_a_restarted_controller_starts_from_the_measured_joint_state_not_a_stale_command(stack):
    client, node = stack.client, stack.client.node
    _moving(stack)
    stack.kill("m2vla_controller")
    t_dead = time.monotonic()
    last_command = client.commands_since(t_dead - 1.0)[-1]
    # while no controller runs, something else moves the arm (a jog from a teach pendant, here a test
    # publisher): 0.3 rad on joint 1, in small steps the sim's jump guard accepts
    jog = node.create_publisher(JointState, "/m2vla/joint_command", qos.COMMANDS)
    try:
        time.sleep(0.5)
        for k in range(1, 31):
            target = last_command + np.r_[0.01 * k, np.zeros(7)]
            msg = JointState(name=list(PANDA_JOINT_NAMES), position=target.tolist())
            msg.header.frame_id = TEST_FRAME
            jog.publish(msg)
            time.sleep(0.03)
        # on the last jog target, not one 0.01 rad step short of it (a loaded sim lags a step)
        client.wait_for(lambda: (client.latest("sim_joints") is not None
                                 and abs(client.latest("sim_joints")[0] - target[0]) < 0.002), 10.0,
                        "the sim arm to follow the jog")
    finally:
        node.destroy_publisher(jog)
    measured = client.latest("sim_joints")
    jumps_before = client.counter("m2vla_sim", "commands_ignored_jump")
    # no chunks while the new controller starts, so what it streams first is visible after DDS
    # discovery (commands sent before a subscriber is discovered never reach it)
    answer = client.call(Stop, "/m2vla_policy/stop", Stop.Request(reason="safety test: controller restart"))
    assert answer.success, answer.message

    t_restart = time.monotonic()
    restart_stamp_s = node.get_clock().now().nanoseconds * 1e-9  # commands are stamped when sent
    stack.restart("m2vla_controller")

    def new_commands() -> np.ndarray:  # (N, 1 + 8) sent by the new process (a late sample of the old one is not)
        rows = client.commands_since(t_restart, stamped=True)
        return rows[rows[:, 0] >= restart_stamp_s]

    client.wait_for(lambda: len(new_commands()) > 50, 60.0, "the restarted controller's commands")
    first = new_commands()[:, 1:]  # (N, 8)
    assert np.abs(first - measured).max() < 0.01, f"the new controller streams {first[0]}, not the measured {measured}"
    assert abs(first[0, 0] - last_command[0]) > 0.25, "the restarted controller replayed the pre-crash command"
    _moving(stack, "push the blue cube to the green zone")  # a new instruction: the policy acts again
    time.sleep(1.0)
    assert_no_jump(new_commands())
    t_check = time.monotonic()
    client.wait_for(lambda: client.diagnostics("m2vla_sim", t_check), 5.0, "fresh sim diagnostics")
    assert client.counter("m2vla_sim", "commands_ignored_jump") == jumps_before, "the sim had to guard against a jump"


def test_the_controller_holds_and_reports_when_the_sim_stops_publishing_joint_states(stack):
    client = stack.client
    _moving(stack)
    sim = stack.process("m2vla_sim")
    sim.send_signal(signal.SIGSTOP)  # the driver hangs: no /joint_states (and no camera) any more
    try:
        t_stop, stop_stamp = time.monotonic(), client.now_stamp()
        time.sleep(0.25 + 0.5 + OBSERVE_S)  # controller.yaml max_joint_state_age_s 0.25, then observe
        _held(client, stop_stamp + 0.6)
        status = client.latest("controller_status", since=t_stop + 0.6)
        assert status.state == ControllerStatus.STATE_HOLDING and status.hold_reason == "stale_joint_state", status
        # policy.yaml max_joint_state_age_s 0.2 + one 10 Hz tick, generously
        assert client.chunks_computed_after(stop_stamp + 0.5) == 0, "the policy acted on a stale joint state"
        assert client.latest("policy_status").state == PolicyStatus.STATE_WAITING
    finally:
        sim.send_signal(signal.SIGCONT)
    t_resume = time.monotonic()
    stack.wait_for_motion(t_resume, chunks=3)
    time.sleep(0.5)
    assert_no_jump(client.commands_since(t_stop, stamped=True))
    assert not stack.graph.dead(), f"a node died: {stack.graph.dead()}"
