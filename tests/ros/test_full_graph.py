"""The whole graph (sim, perception, policy, controller) as real processes over real DDS.

Started exactly as a user starts it (``m2vla_ros.bringup.Graph`` from the shared spec, the
shipped policy), driven from this test process as the operator's client. Every assertion is
on what crosses the wire: task success from the sim's status, the command stream, the
policy's status and its services.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String

from m2vla_core.control import PANDA_JOINT_NAMES
from m2vla_core.policy_engine import default_policy_path
from m2vla_core.rosenv import ros_environment
from m2vla_msgs.msg import PolicyStatus
from m2vla_msgs.srv import LoadPolicy, Reset
from m2vla_ros import graph, qos
from m2vla_ros.bringup import Graph
from m2vla_ros.demo import DemoClient, call_service, run_episode, wait_until_ready

SEED = 10_000  # held-out: the shipped policy was trained on seeds < 1000
# A head trained on one layout per task (scripts/make_graph_test_policy.sh): `m2vla eval` solves
# these layouts with it, so the graph must too. It is no policy for users; it checks the graph.
ONE_LAYOUT_POLICY = Path(__file__).resolve().parents[1] / "fixtures" / "policies" / "one_layout"
ONE_LAYOUT_SEED = 3
# controller.yaml: 250 Hz, velocity limits [rad/s ... m/s]. Between consecutive commands no joint
# may move further than its limit allows in the command periods between their stamps (5 % for
# rounding). A blend that jumped would exceed it by far.
COMMAND_PERIOD_S = 1.0 / 250.0
VELOCITY_LIMIT = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61, 0.5])


def assert_no_jump(stamped: np.ndarray) -> None:
    """(N, 1 + 8) rows of [stamp_s, command...], as received (this subscriber may miss some)."""
    periods = np.maximum(1.0, np.round(np.diff(stamped[:, 0]) / COMMAND_PERIOD_S))[:, None]  # (N-1, 1)
    step_per_period = np.abs(np.diff(stamped[:, 1:], axis=0)) / periods  # (N-1, 8)
    worst = step_per_period.max(axis=0)
    allowed = VELOCITY_LIMIT * COMMAND_PERIOD_S * 1.05
    assert (worst <= allowed).all(), f"command steps per period {worst} exceed velocity x period {allowed}"


@dataclass
class Stack:
    graph: Graph
    client: DemoClient
    commands: list  # (receipt monotonic, header stamp [s], (8,) command)
    lock: threading.Lock
    reset_done_stamp_s: float = 0.0  # ROS time when the last start_episode's controller reset returned

    def process(self, name: str):
        return next(r.process for r in self.graph.running if r.node.name == name)

    def commands_since(self, t: float, *, stamped: bool = False) -> np.ndarray:
        """(N, 8) commands received after monotonic ``t``; ``stamped``: (N, 1 + 8) with the stamp first."""
        with self.lock:
            rows = [np.r_[stamp, c] if stamped else c for tc, stamp, c in self.commands if tc >= t]
        return np.array(rows).reshape(-1, len(PANDA_JOINT_NAMES) + int(stamped))

    def policy_status(self) -> PolicyStatus | None:
        with self.client.lock:
            return self.client.policy_status

    def chunks_since(self, t: float) -> int:
        with self.client.lock:
            return sum(1 for tc, _ in self.client.chunk_times if tc >= t)

    def start_episode(self, task: str, seed: int) -> float:
        """Reset sim + controller to a fresh episode, publish its instruction; -> monotonic time of the publish."""
        reset = call_service(self.client.sim_reset, Reset.Request(task=task, seed=seed), 60.0)
        assert reset.success, reset.message
        call_service(self.client.controller_reset, Reset.Request(task="", seed=-1), 30.0)
        self.reset_done_stamp_s = self.client.get_clock().now().nanoseconds * 1e-9
        t = time.monotonic()
        self.client.instruction_pub.publish(String(data=reset.instruction))
        return t

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    domain = 10 + (os.getpid() % 80)
    env = ros_environment()
    env["ROS_DOMAIN_ID"] = str(domain)
    env["PYTHONUNBUFFERED"] = "1"
    logs = tmp_path_factory.mktemp("graph_logs")
    running = Graph(graph.parse_arguments(["sim:=true", "rviz:=false"]), env=env, log_dir=logs)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    client = DemoClient(context=context)
    lock = threading.Lock()
    commands: list = []

    def on_command(msg: JointState) -> None:
        with lock:
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            commands.append((time.monotonic(), stamp, np.asarray(msg.position, dtype=float)))

    client.create_subscription(JointState, "/m2vla/joint_command", on_command, qos.COMMANDS)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    running.start()
    dead: list = []
    try:
        wait_until_ready(client, 180.0)
        yield Stack(running, client, commands, lock)
        dead = running.dead()
    finally:
        running.stop()
        executor.shutdown(timeout_sec=2.0)
        client.destroy_node()
        rclpy.shutdown(context=context)
        for log in sorted(Path(logs).glob("*.log")):  # kept in the pytest output on failure
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
    assert not dead, f"node(s) died during the tests: {dead}"


def test_an_instruction_from_a_client_process_drives_the_arm_through_the_whole_graph(stack):
    """Instruction -> perception -> policy -> controller -> sim: the arm leaves its home pose.

    The shipped tiny-backbone policy does not solve held-out layouts reliably (docs/results.md),
    so success is asserted with the one-layout head in the next test, not here.
    """
    t0 = time.monotonic()
    result = run_episode(stack.client, "reach_above", SEED, timeout_s=6.0, gif_dir=None)
    assert result.first_chunk_ms is not None, "no chunk followed the instruction"
    assert result.first_command_ms is not None, "no command followed the instruction"
    commands = stack.commands_since(t0)  # (N, 8)
    assert len(commands) > 100
    travel = np.abs(commands[:, :7] - commands[0, :7]).max()
    assert travel > 0.05, f"the arm moved only {travel:.3f} rad in 6 s of policy commands"


def test_a_layout_the_policy_solves_in_the_sim_is_solved_through_the_graph_for_two_tasks(stack):
    """Success through the graph: camera -> VLM -> head -> chunks -> controller -> sim, over DDS.

    The shipped policy does not solve held-out layouts reliably (docs/results.md), so this swaps
    in the one-layout head (hot, through ~/load_policy) and runs the layouts it was trained on.
    Timing differs from `m2vla eval` (features arrive late, chunks blend at 250 Hz instead of
    being stepped), which is what the graph must tolerate.
    """
    load = stack.client.create_client(LoadPolicy, "/m2vla_policy/load_policy")
    try:
        answer = call_service(load, LoadPolicy.Request(checkpoint=str(ONE_LAYOUT_POLICY), backend=""), 60.0)
        assert answer.success, answer.message
        for task in ("reach_above", "pick_lift"):
            result = run_episode(stack.client, task, ONE_LAYOUT_SEED, timeout_s=30.0, gif_dir=None)
            assert result.success, (f"{task}: no success in 30 s through the graph (first chunk "
                                    f"{result.first_chunk_ms} ms, first command {result.first_command_ms} ms)")
    finally:
        call_service(load, LoadPolicy.Request(checkpoint="", backend="onnxruntime"), 60.0)
        stack.client.destroy_client(load)


def test_commands_never_jump_when_new_chunks_blend_into_the_one_in_flight(stack):
    t0 = stack.start_episode("push_to_zone", SEED + 1)
    stack.wait_for(lambda: stack.chunks_since(t0) >= 8, 60.0, "8 chunks")
    commands = stack.commands_since(t0, stamped=True)
    # the reset itself re-anchors on the measured arm (a jump by design): count only commands
    # stamped after the controller answered the reset, not older ones that arrived after it
    commands = commands[commands[:, 0] >= stack.reset_done_stamp_s]
    assert len(commands) > 100
    assert_no_jump(commands)


def test_estop_mid_motion_holds_the_arm_and_the_policy_stops(stack):
    t0 = time.monotonic()
    stack.start_episode("pick_lift", SEED + 2)
    stack.wait_for(lambda: stack.chunks_since(t0) >= 2, 60.0, "the arm to start moving")
    estop = stack.client.create_publisher(Bool, "/m2vla/estop", qos.ESTOP)
    try:  # a message published before discovery matched a subscriber is lost for it (volatile QoS)
        stack.wait_for(lambda: estop.get_subscription_count() >= 2, 10.0, "controller and policy to match the e-stop")
        t_stop = time.monotonic()
        estop.publish(Bool(data=True))
        time.sleep(1.0)
        held = stack.commands_since(t_stop + 0.1)  # DDS delivery + one command period, generously
        assert len(held) > 50, "the controller must keep streaming the held position"
        assert np.ptp(held, axis=0).max() < 1e-9, "commands changed while the e-stop was engaged"
        status = stack.policy_status()
        assert status.state == PolicyStatus.STATE_WAITING and "e-stop" in status.message
        assert stack.chunks_since(t_stop + 0.2) == 0, "the policy published chunks during the e-stop"
    finally:  # the release must arrive before the publisher goes, or the policy stays latched
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            estop.publish(Bool(data=False))
            time.sleep(0.2)
            status = stack.policy_status()
            if status is not None and "e-stop latched" not in status.message:
                break
        stack.client.destroy_publisher(estop)


def test_stale_features_stop_the_chunks_and_the_controller_holds_then_motion_resumes(stack):
    t0 = time.monotonic()
    stack.start_episode("place_on_zone", SEED + 3)
    stack.wait_for(lambda: stack.chunks_since(t0) >= 2, 60.0, "the first chunks")
    perception = stack.process("m2vla_perception")
    perception.send_signal(signal.SIGSTOP)  # a frozen perception process: features stop, nothing else does
    try:
        t_freeze = time.monotonic()
        # policy.yaml max_feature_age_s 0.5, then controller chunk_timeout_s 1.5 (+ DDS), then observe 1.5 s
        time.sleep(4.2)
        assert stack.chunks_since(t_freeze + 1.0) == 0, "chunks kept coming from stale features"
        held = stack.commands_since(t_freeze + 2.7)
        assert len(held) > 50 and np.ptp(held, axis=0).max() < 1e-9, "the controller did not hold"
        status = stack.policy_status()
        assert status.state == PolicyStatus.STATE_WAITING, status.message
    finally:
        perception.send_signal(signal.SIGCONT)
    t_resume = time.monotonic()
    stack.wait_for(lambda: stack.chunks_since(t_resume) >= 2, 30.0, "chunks after perception resumed")
    time.sleep(1.0)
    assert_no_jump(stack.commands_since(t_resume, stamped=True))


def test_load_policy_swaps_the_checkpoint_while_running_and_refuses_a_bad_one(stack):
    t0 = time.monotonic()
    stack.start_episode("stack", SEED + 4)
    stack.wait_for(lambda: stack.chunks_since(t0) >= 1, 60.0, "the first chunk")
    load = stack.client.create_client(LoadPolicy, "/m2vla_policy/load_policy")
    try:
        answer = call_service(load, LoadPolicy.Request(checkpoint=str(default_policy_path()), backend="torch"), 60.0)
        assert answer.success and answer.error_code == LoadPolicy.Request.OK, answer.message
        stack.wait_for(lambda: stack.policy_status().backend == "torch", 10.0, "status to report the torch backend")
        t_swap = time.monotonic()
        stack.client.instruction_pub.publish(String(data="pick up the red cube"))
        stack.wait_for(lambda: stack.chunks_since(t_swap) >= 2, 30.0, "chunks from the swapped-in head")

        missing = call_service(load, LoadPolicy.Request(checkpoint="/nonexistent/ckpt", backend=""), 30.0)
        assert not missing.success and missing.error_code == LoadPolicy.Request.NOT_FOUND
        assert stack.policy_status().backend == "torch", "a refused load must keep the running head"
    finally:
        call_service(load, LoadPolicy.Request(checkpoint="", backend="onnxruntime"), 60.0)
        stack.client.destroy_client(load)


def test_a_head_trained_at_another_input_size_gets_perception_at_that_size(stack, tmp_path):
    """The contract carries the head's input size: perception reloads its VLM at 448 px, then back."""
    sized = tmp_path / "one_layout_448"
    shutil.copytree(ONE_LAYOUT_POLICY, sized, ignore=shutil.ignore_patterns("model.onnx"))
    config = json.loads((sized / "config.json").read_text())
    config["contract"]["image_size"] = 448
    (sized / "config.json").write_text(json.dumps(config))

    def perception_size() -> str:
        with stack.client.lock:
            return stack.client.perception.get("backbone_image_size", "")

    load = stack.client.create_client(LoadPolicy, "/m2vla_policy/load_policy")
    try:
        answer = call_service(load, LoadPolicy.Request(checkpoint=str(sized), backend="torch"), 60.0)
        assert answer.success, answer.message
        t0 = stack.start_episode("reach_above", ONE_LAYOUT_SEED)
        stack.wait_for(lambda: perception_size() == "448", 60.0, "perception to reload its backbone at 448 px")
        stack.wait_for(lambda: stack.chunks_since(t0) >= 2, 60.0, "chunks from features at 448 px")
    finally:
        call_service(load, LoadPolicy.Request(checkpoint="", backend="onnxruntime"), 60.0)
        stack.client.destroy_client(load)
    stack.wait_for(lambda: perception_size() == "224", 60.0, "perception back at its default 224 px")
