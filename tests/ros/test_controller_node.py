"""The controller node in a real process over real DDS, driven by a test-side rclpy peer.

The peer plays the arm (it publishes /joint_states equal to the last command: a perfect
position-controlled arm, or one stuck where it is), the policy (chunks) and the operator (e-stop, services). Holds are
asserted on the command stream itself (held positions), never on timing. A second module
part closes the loop through the PyBullet sim node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool
from trajectory_msgs.msg import JointTrajectory

from m2vla_core.control import PANDA_JOINT_NAMES, PANDA_LIMITS
from m2vla_core.rosenv import ros_environment
from m2vla_msgs.msg import ActionChunk, ControllerStatus, TaskStatus
from m2vla_msgs.srv import Reset
from m2vla_ros import node_process, qos
from m2vla_ros.conversions import array_to_joint_state, chunk_to_msg, diagnostic_values, joint_state_to_array

HOME = np.array([0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785, 0.08])  # 7 arm joints [rad] + gripper opening [m]
SIM_JOINTS = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]
RATE_HZ = 250.0
VMAX_J1 = 2.175  # [rad/s] panda_joint1 velocity limit (controller.yaml)
WAIT_S = 20.0
ENSEMBLE_COMMANDS = "/test_ensemble/joint_command"  # the rig's second controller, which averages 2 chunks


def _domain(offset: int) -> int:
    return 120 + (os.getpid() % 50) * 2 + offset  # 120..221, distinct per test run and module part


def _start(module: str, domain: int, log: Path, *params: str, remaps: tuple[str, ...] = ()) -> subprocess.Popen:
    env = ros_environment()
    env["ROS_DOMAIN_ID"] = str(domain)
    env["PYTHONUNBUFFERED"] = "1"
    args = [sys.executable, "-m", module, "--ros-args"]
    for p in params:
        args += ["-p", p]
    for r in remaps:
        args += ["-r", r]
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, log: Path) -> int:
    """SIGINT, as bringup sends it -> the exit code, 0 for a clean stop.

    A node whose teardown outlived node_process.TEARDOWN_LIMIT_S exits 1 by design, with its
    stacks in its log: that counts as a stop (bounded, and it says where it hung), with a warning
    that shows the stacks. A node still alive after 10 s gets SIGUSR1 (stacks) and SIGKILL: -9.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node_process.request_stack_dumps([proc])  # into its log: where it hung
            proc.kill()
            proc.wait(timeout=5)
    text = log.read_text(errors="replace") if log.exists() else ""
    if proc.returncode == 1 and node_process.TEARDOWN_TIMEOUT_MARK in text:
        warnings.warn(f"{log.name}: teardown cut off after {node_process.TEARDOWN_LIMIT_S} s:\n{text[-4000:]}",
                      stacklevel=2)
        return 0
    return proc.returncode


def _log_tails(*logs: Path, chars: int = 3000) -> str:
    """The end of each node's log, for a failure message (CI keeps no tmp_path)."""
    return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-chars:] if log.exists() else '(no log)'}"
                     for log in logs)


class Peer:
    """Test-side rclpy node on its own context and domain, spun in a thread."""

    def __init__(self, domain: int, *, play_arm: bool = True) -> None:
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain)
        self.node = Node(f"m2vla_test_peer_{domain}", context=self.ctx)
        self.lock = threading.Lock()
        self.commands: list[tuple[float, np.ndarray]] = []  # (receipt monotonic, (8,) command)
        self.ensemble_commands: list[np.ndarray] = []  # the ensembling controller's (8,) commands
        self.command_stamps: list[float] = []  # [s] header stamps: the controller's send time
        self.statuses: list[tuple[float, ControllerStatus]] = []
        self.trajectories: list[JointTrajectory] = []
        self.sim_joints: JointState | None = None
        self.task_status: TaskStatus | None = None
        self.arm = HOME.copy()
        self.stuck_at: np.ndarray | None = None  # (8,) the arm reports this whatever it is told
        self.controller_diagnostics: list[dict[str, str]] = []  # m2vla_controller's /diagnostics values
        self.publish_joint_states = play_arm
        n = self.node
        self.chunk_pub = n.create_publisher(ActionChunk, "/m2vla/action_chunk", qos.CHUNKS)
        self.estop_pub = n.create_publisher(Bool, "/m2vla/estop", qos.ESTOP)
        self.joint_pub = n.create_publisher(JointState, "/joint_states", qos.SENSOR_PUB)
        n.create_subscription(JointState, "/m2vla/joint_command", self._on_command, qos.COMMANDS)
        n.create_subscription(JointState, ENSEMBLE_COMMANDS, self._on_ensemble_command, qos.COMMANDS)
        n.create_subscription(ControllerStatus, "/m2vla/controller_status", self._on_status, qos.STATUS)
        n.create_subscription(JointTrajectory, "/test_jtc/joint_trajectory", self._on_trajectory, qos.COMMANDS)
        n.create_subscription(TaskStatus, "/m2vla/task_status", self._on_task, qos.STATUS)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos.STATUS)
        if not play_arm:
            n.create_subscription(JointState, "/joint_states", self._on_sim_joints, qos.SENSOR)
        self.reset_client = n.create_client(Reset, "/m2vla_controller/reset")
        self.sim_reset_client = n.create_client(Reset, "/m2vla_sim/reset")
        self.ensemble_reset_client = n.create_client(Reset, "/m2vla_controller_ensemble/reset")
        n.create_timer(0.01, self._play_arm)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    # -- callbacks
    def _on_command(self, msg: JointState) -> None:
        q = joint_state_to_array(msg, PANDA_JOINT_NAMES)
        with self.lock:
            self.commands.append((time.monotonic(), q))
            self.command_stamps.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
            self.arm = q.copy()

    def _on_ensemble_command(self, msg: JointState) -> None:
        with self.lock:
            self.ensemble_commands.append(joint_state_to_array(msg, PANDA_JOINT_NAMES))

    def _on_status(self, msg: ControllerStatus) -> None:
        with self.lock:
            self.statuses.append((time.monotonic(), msg))

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        with self.lock:
            self.trajectories.append(msg)

    def _on_task(self, msg: TaskStatus) -> None:
        with self.lock:
            self.task_status = msg

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self.lock:
            self.controller_diagnostics += [diagnostic_values(s) for s in msg.status if s.name == "m2vla_controller"]

    def _on_sim_joints(self, msg: JointState) -> None:
        with self.lock:
            self.sim_joints = msg

    def _play_arm(self) -> None:
        if self.publish_joint_states:
            with self.lock:
                q = (self.arm if self.stuck_at is None else self.stuck_at).copy()
            positions = np.concatenate([q[:7], [q[7] / 2, q[7] / 2]])  # the opening as two fingers
            self.joint_pub.publish(array_to_joint_state(SIM_JOINTS, positions,
                                                        stamp=self.node.get_clock().now().to_msg()))

    # -- helpers
    def now_stamp(self):
        return self.node.get_clock().now().to_msg()

    def publish_chunk(self, values: np.ndarray, sequence_id: int, dt_s: float = 0.05, names=PANDA_JOINT_NAMES,
                      observation_stamp=None, nan_at: int | None = None) -> None:
        stamp = self.now_stamp()
        msg = chunk_to_msg(values, names=list(names), dt_s=dt_s, stamp=stamp,
                           observation_stamp=observation_stamp or stamp, sequence_id=sequence_id)
        if nan_at is not None:  # chunk_to_msg refuses NaN; corrupt the message as a faulty policy would
            msg.values[nan_at] = float("nan")
        self._until_matched(self.chunk_pub, "the controller's chunk subscription")
        self.chunk_pub.publish(msg)

    def _until_matched(self, publisher, what: str) -> None:
        """A volatile sample published before discovery matched the reader is lost for it (CI: a
        first chunk the controller never saw, published right after its command stream came up)."""
        self.wait_for(lambda: publisher.get_subscription_count() > 0, f"{what} to be matched", 20.0)

    def command_stream(self, since: float = 0.0) -> np.ndarray:
        with self.lock:
            return np.array([q for t, q in self.commands if t >= since])  # (N, 8)

    def steps_per_period(self, since: float, joint: int) -> np.ndarray:
        """|change| of one joint per command period, from stamps (a dropped command is not a jump)."""
        with self.lock:
            rows = [(st, q[joint]) for (t, q), st in zip(self.commands, self.command_stamps) if t >= since]
        stamps, q = np.array(rows).T  # (N,), (N,)
        periods = np.maximum(1.0, np.round(np.diff(stamps) * RATE_HZ))  # (N-1,)
        return np.abs(np.diff(q)) / periods

    def last_command(self) -> np.ndarray:
        with self.lock:
            return self.commands[-1][1].copy()

    def latest_status(self) -> ControllerStatus | None:
        with self.lock:
            return self.statuses[-1][1] if self.statuses else None

    def wait_for(self, predicate, what: str, timeout_s: float = WAIT_S, detail=None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value is not None and (isinstance(value, np.ndarray) or value):
                return value
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}" + (f"\n{detail()}" if detail else ""))

    def wait_status(self, check, what: str, timeout_s: float = WAIT_S) -> ControllerStatus:
        def found():
            with self.lock:
                for _, s in reversed(self.statuses[-5:]):
                    if check(s):
                        return s
            return None
        return self.wait_for(found, what, timeout_s)

    def call(self, client, request, timeout_s: float = WAIT_S):
        assert client.wait_for_service(timeout_sec=timeout_s), f"service {client.srv_name} not available"
        future = client.call_async(request)
        self.wait_for(future.done, f"{client.srv_name} response", timeout_s)
        return future.result()

    def reset_controller(self) -> None:
        with self.lock:
            self.arm = HOME.copy()
        self._until_matched(self.estop_pub, "the controller's e-stop subscription")
        self.estop_pub.publish(Bool(data=False))
        assert self.call(self.reset_client, Reset.Request(task="", seed=-1)).success
        self.wait_status(lambda s: s.hold_reason in ("reset", "no_chunk"), "controller holding after reset")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def ramp(joint: int, delta: float, horizon: int, start: np.ndarray | None = None, dt_s: float = 0.05) -> np.ndarray:
    """(H, 8) waypoints moving one joint linearly by ``delta`` from ``start`` (default home)."""
    values = np.tile(HOME if start is None else start, (horizon, 1))
    values[:, joint] += delta * (np.arange(1, horizon + 1) / horizon)
    return values


# ----------------------------------------------------------------------------- controller only
@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    logs = tmp_path_factory.mktemp("controller")
    domain = _domain(0)
    # one chunk at a time (no ensemble): these tests specify how a chunk is followed and blended into
    ctl = _start("m2vla_ros.controller_node", domain, logs / "controller.log",
                 "workspace_check:=false", "chunk_timeout_s:=1.0", f"command_rate_hz:={RATE_HZ}", "ensemble_chunks:=1")
    jtc = _start("m2vla_ros.controller_node", domain, logs / "jtc.log", "output:=joint_trajectory",
                 "trajectory_topic:=/test_jtc/joint_trajectory", "workspace_check:=false",
                 "command_rate_hz:=50.0",
                 remaps=("__node:=m2vla_controller_jtc", "/m2vla/controller_status:=/test_jtc/status",
                         "/diagnostics:=/test_jtc/diagnostics"))
    # the same chunks, averaged over the newest two that cover now (the shipped controller.yaml: 4), the older
    # weighing 1 and the newer exp(-0.7) (the node's default ensemble_decay)
    ens = _start("m2vla_ros.controller_node", domain, logs / "ensemble.log", "workspace_check:=false",
                 "chunk_timeout_s:=5.0", "command_rate_hz:=100.0", "ensemble_chunks:=2",
                 f"command_topic:={ENSEMBLE_COMMANDS}",
                 remaps=("__node:=m2vla_controller_ensemble", "/m2vla/controller_status:=/test_ensemble/status",
                         "/diagnostics:=/test_ensemble/diagnostics"))
    peer = Peer(domain)
    try:
        peer.wait_for(lambda: len(peer.commands) > 10, f"first commands (log: {logs / 'controller.log'})", 60.0)
        yield peer, logs
    finally:
        peer.close()
        codes = [_stop(ctl, logs / "controller.log"), _stop(jtc, logs / "jtc.log"), _stop(ens, logs / "ensemble.log")]
    assert codes == [0, 0, 0], (f"controller exited with {codes}:\n"
                                f"{_log_tails(logs / 'controller.log', logs / 'jtc.log', logs / 'ensemble.log')}")


def test_a_chunk_leads_to_commands_that_move_toward_its_target(rig):
    peer, logs = rig
    peer.reset_controller()
    t0 = time.monotonic()
    target = HOME[0] + 0.3
    peer.publish_chunk(ramp(0, 0.3, horizon=20), sequence_id=1)  # 1 s to +0.3 rad on panda_joint1
    peer.wait_for(lambda: peer.last_command()[0] > target - 0.02, "panda_joint1 near the target")
    stream = peer.command_stream(since=t0)
    # the acceleration limit may overshoot a target whose speed drops and come back: never further
    # back in total than the braking distance v^2 / 2a (0.3 rad/s, 15 rad/s^2: 3 mrad); CI saw
    # steps back of 0.75-1 mrad
    overshoot = 0.3 ** 2 / (2 * PANDA_LIMITS.acceleration[0])
    retreat = np.maximum.accumulate(stream[:, 0]) - stream[:, 0]  # (N,) behind the furthest point so far
    assert retreat.max() <= overshoot, "commands moved away from the target"
    assert peer.steps_per_period(t0, 0).max() <= VMAX_J1 / RATE_HZ + 1e-6
    np.testing.assert_allclose(stream[-1, 1:], HOME[1:], atol=1e-9)  # the other joints held still
    peer.wait_status(lambda s: s.chunks_accepted >= 1 and s.command_rate_hz > 0, "status with the accepted chunk")


def test_estop_holds_the_commanded_position_immediately_and_until_reset(rig):
    peer, _ = rig
    peer.reset_controller()
    peer.publish_chunk(ramp(0, 0.6, horizon=60), sequence_id=1)  # 3 s motion
    peer.wait_for(lambda: peer.last_command()[0] > HOME[0] + 0.05, "motion before the e-stop")
    t_estop = time.monotonic()
    peer.estop_pub.publish(Bool(data=True))
    peer.wait_status(lambda s: s.state == ControllerStatus.STATE_ESTOP and s.hold_reason == "estop", "e-stop state")
    time.sleep(0.3)
    stream = peer.command_stream(since=t_estop)
    moving = np.flatnonzero(np.abs(np.diff(stream[:, 0])) > 0)
    held = stream[-1]
    last_move = moving[-1] + 1 if moving.size else 0
    # no braking ramp: the step into the hold is a full tracking step, and nothing moves afterwards
    np.testing.assert_array_equal(stream[last_move:], np.tile(held, (len(stream) - last_move, 1)))
    assert len(stream) - last_move > 20
    # chunks are refused while latched
    peer.publish_chunk(ramp(0, 0.3, horizon=20, start=held), sequence_id=2)
    peer.wait_status(lambda s: s.chunks_rejected >= 1, "chunk refused during e-stop")
    assert np.array_equal(peer.last_command(), held)
    # releasing does not resume the old chunk
    t_release = time.monotonic()
    peer.estop_pub.publish(Bool(data=False))
    peer.wait_status(lambda s: s.state == ControllerStatus.STATE_HOLDING, "holding after release")
    time.sleep(0.2)
    after = peer.command_stream(since=t_release)
    np.testing.assert_array_equal(after, np.tile(held, (len(after), 1)))


def test_bad_chunks_are_refused_counted_and_never_move_the_arm(rig):
    peer, _ = rig
    peer.reset_controller()
    before = peer.wait_status(lambda s: True, "a status").chunks_rejected
    held = peer.last_command()
    old = peer.node.get_clock().now().to_msg()
    old.sec -= 30
    bad = [  # chunks are newest-wins (depth 1): send one at a time and wait for its rejection
        dict(values=ramp(0, 0.3, horizon=10), nan_at=3 * 8 + 2),  # NaN
        dict(values=ramp(0, 0.3, horizon=10)[:, :7], names=PANDA_JOINT_NAMES[:7]),  # a joint missing
        dict(values=ramp(3, 5.0, horizon=10)),  # joint 4 far out of its limits
        dict(values=ramp(0, 0.3, horizon=10), observation_stamp=old),  # 30 s old observation
    ]
    for i, kwargs in enumerate(bad):
        peer.publish_chunk(sequence_id=i + 1, **kwargs)
        peer.wait_status(lambda s, n=before + i + 1: s.chunks_rejected >= n, f"rejection {i + 1} counted", 10.0)
    assert peer.latest_status().chunks_accepted == peer.wait_status(lambda s: True, "status").chunks_accepted
    assert np.array_equal(peer.last_command(), held)
    t = time.monotonic()
    time.sleep(0.2)
    stream = peer.command_stream(since=t)
    np.testing.assert_array_equal(stream, np.tile(held, (len(stream), 1)))


def test_stale_joint_state_and_stale_chunks_make_it_hold(rig):
    peer, _ = rig
    peer.reset_controller()
    peer.publish_chunk(ramp(0, 0.6, horizon=60), sequence_id=1)
    peer.wait_for(lambda: peer.last_command()[0] > HOME[0] + 0.03, "motion")
    peer.publish_joint_states = False  # the arm driver stops publishing
    try:
        status = peer.wait_status(lambda s: s.hold_reason == "stale_joint_state", "stale joint state hold")
        assert status.state == ControllerStatus.STATE_HOLDING
        held = peer.last_command()
        time.sleep(0.2)
        np.testing.assert_array_equal(peer.last_command(), held)
    finally:
        peer.publish_joint_states = True
    # joint states are back, but no new chunk arrives within chunk_timeout_s (1 s): still holding
    peer.wait_status(lambda s: s.hold_reason == "stale_chunk", "stale chunk hold")
    held = peer.last_command()
    t = time.monotonic()
    time.sleep(0.2)
    stream = peer.command_stream(since=t)
    np.testing.assert_array_equal(stream, np.tile(held, (len(stream), 1)))


def test_a_new_chunk_blends_into_the_one_in_flight_without_a_jump(rig):
    peer, _ = rig
    peer.reset_controller()
    t0 = time.monotonic()
    peer.publish_chunk(ramp(0, 0.6, horizon=40), sequence_id=1)  # 0.3 rad/s for 2 s
    peer.wait_for(lambda: peer.last_command()[0] > HOME[0] + 0.1, "chunk A in flight")
    current = peer.last_command()
    corrected = ramp(0, 0.3, horizon=20, start=current + np.r_[0.05, np.zeros(7)])  # 5 cm-ish correction ahead
    peer.publish_chunk(corrected, sequence_id=2)
    peer.wait_for(lambda: peer.last_command()[0] > corrected[-1, 0] - 0.02, "chunk B reached")
    typical = 0.3 / RATE_HZ
    seam_bound = 2 * typical + 1.5 * 0.065 / (0.1 * RATE_HZ)  # motion + steepest slope of the 0.1 s cross-fade
    assert peer.steps_per_period(t0, 0).max() <= seam_bound


def test_with_ensemble_chunks_the_node_follows_the_mean_of_the_chunks_that_cover_now(rig):
    peer, logs = rig
    peer.reset_controller()
    assert peer.call(peer.ensemble_reset_client, Reset.Request(task="", seed=-1)).success
    out = HOME.copy()
    out[0] += 0.2

    def ensemble_settled_at(offset: float) -> bool:
        """The ensembling controller's last 10 commands (0.1 s) hold panda_joint1 at HOME + offset."""
        with peer.lock:
            recent = np.array([q[0] for q in peer.ensemble_commands[-10:]]) - HOME[0]
        return len(recent) == 10 and bool(np.all(np.abs(recent - offset) < 2e-3))

    def seen() -> str:
        with peer.lock:
            recent = [round(float(q[0] - HOME[0]), 4) for q in peer.ensemble_commands[-400:][::20]]
        return f"panda_joint1 - home, every 20th command: {recent}\n{_log_tails(logs / 'ensemble.log')}"

    t_a = time.monotonic()
    peer.publish_chunk(np.tile(out, (60, 1)), sequence_id=1)  # A: panda_joint1 0.2 rad out, for 3 s
    peer.wait_for(lambda: peer.last_command()[0] > HOME[0] + 0.15, "the newest-chunk controller following A")
    # both following A before B goes out (chunks are keep-last 1: a B published first would replace A unread)
    peer.wait_for(lambda: ensemble_settled_at(0.2), "the ensemble following A", 5.0, detail=seen)
    peer.publish_chunk(np.tile(HOME, (100, 1)), sequence_id=2)  # B: home, for 5 s
    # while both cover now: the ensemble at their weighted mean, the newest-chunk controller on B
    mean = 0.2 / (1.0 + np.exp(-0.7))  # A (0.2, the older: weight 1) and B (0.0, weight exp(-0.7))
    peer.wait_for(lambda: ensemble_settled_at(mean), "the ensemble at the mean of A and B", 5.0, detail=seen)
    assert time.monotonic() - t_a < 3.0, "the ensemble reached the mean only after A had ended"
    peer.wait_for(lambda: abs(peer.last_command()[0] - HOME[0]) < 2e-3, "the newest-chunk controller on B", 5.0)
    # A's last waypoint passed: B alone, home
    peer.wait_for(lambda: ensemble_settled_at(0.0), "the ensemble on B alone after A ended", 5.0, detail=seen)
    assert time.monotonic() - t_a < 5.0, "the ensemble came home only after B had ended"


def test_an_arm_that_stops_following_its_commands_is_held_where_it_is_until_reset(rig):
    peer, _ = rig
    peer.reset_controller()
    with peer.lock:
        peer.stuck_at = HOME.copy()  # blocked: the joint states stay at home
    try:
        peer.publish_chunk(ramp(0, 0.8, horizon=20), sequence_id=1)  # 0.8 rad/s for 1 s on panda_joint1
        peer.wait_status(lambda s: s.hold_reason == "following_error", "the following-error hold")
        # 0.3 rad (the default limit) behind for 0.5 s: the commands went at most ~0.8 rad out, then came
        # back to where the arm is, and stay there
        peer.wait_for(lambda: np.allclose(peer.last_command(), HOME, atol=1e-6), "commands back at the measured arm")
        rejected = peer.latest_status().chunks_rejected
        peer.publish_chunk(ramp(0, 0.3, horizon=20), sequence_id=2)
        peer.wait_status(lambda s: s.chunks_rejected > rejected, "the chunk refused while latched")
        time.sleep(0.2)
        np.testing.assert_allclose(peer.last_command(), HOME, atol=1e-6)
        peer.wait_for(lambda: any(d.get("following_error_fault", "").startswith("panda_joint1 ")
                                  for d in peer.controller_diagnostics), "the fault in /diagnostics", 5.0)
    finally:
        with peer.lock:
            peer.stuck_at = None
    peer.reset_controller()  # clears the latch
    peer.publish_chunk(ramp(0, 0.3, horizon=20), sequence_id=1)
    peer.wait_for(lambda: peer.last_command()[0] > HOME[0] + 0.2, "tracking again after ~/reset")


def test_joint_trajectory_output_streams_one_point_ahead_for_ros2_control(rig):
    peer, _ = rig
    msg = peer.wait_for(lambda: peer.trajectories[-1] if peer.trajectories else None, "a JointTrajectory")
    assert list(msg.joint_names) == [f"panda_joint{i}" for i in range(1, 8)]
    assert len(msg.points) == 1 and len(msg.points[0].positions) == 7
    point = msg.points[0]
    assert point.time_from_start.sec == 0 and point.time_from_start.nanosec == 20_000_000


# ----------------------------------------------------------------------------- closed loop with the sim
def _expert_actions(task: str, seed: int) -> np.ndarray:
    """The scripted expert's (N, 8) joint targets for one episode, until success (offline, no render)."""
    from m2vla_core.sim import SimConfig, TaskEnv, make_expert

    with TaskEnv(SimConfig(render=False)) as env:
        obs = env.reset(task, seed)
        expert = make_expert(env)
        actions = []
        while not expert.done and not env.success():
            actions.append(expert.act(obs))
            obs = env.step(actions[-1])
        assert env.success(), "the expert itself failed"
    return np.array(actions)


def test_controller_drives_the_pybullet_sim_arm_and_the_sim_resets(tmp_path):
    domain = _domain(1)
    sim = _start("m2vla_ros.sim_node", domain, tmp_path / "sim.log", "camera_rate_hz:=0.0", "task:=reach_above")
    ctl = _start("m2vla_ros.controller_node", domain, tmp_path / "controller.log", "chunk_timeout_s:=2.0")
    peer = Peer(domain, play_arm=False)
    try:
        def joint1():
            with peer.lock:
                msg = peer.sim_joints
            return None if msg is None else joint_state_to_array(msg, PANDA_JOINT_NAMES)

        start = peer.wait_for(joint1, f"sim joint states (log {tmp_path / 'sim.log'})", 60.0)
        peer.wait_for(lambda: len(peer.commands) > 5, f"controller commands (log {tmp_path / 'controller.log'})", 60.0)
        with peer.lock:
            first_command = peer.commands[0][1]
        # a (re)started controller begins from the measured joint state, never from a stale command
        np.testing.assert_allclose(first_command, start, atol=2e-3)
        reply = peer.call(peer.sim_reset_client, Reset.Request(task="push_to_zone", seed=3))
        assert reply.success and reply.instruction, reply.message
        assert not peer.call(peer.sim_reset_client, Reset.Request(task="fly", seed=1)).success
        peer.reset_controller()
        start = joint1()
        peer.publish_chunk(ramp(0, 0.3, horizon=20, start=start), sequence_id=1)
        peer.wait_for(lambda: joint1()[0] > start[0] + 0.2, "the simulated panda_joint1 to follow", 20.0)
        status = peer.wait_for(lambda: peer.task_status, "task status")
        assert status.task == "push_to_zone" and status.instruction == reply.instruction

        # A whole episode through the graph: the scripted expert's actions, sent as chunks at 10 Hz
        # like a policy would, are interpolated, limited and executed until the task succeeds.
        actions = _expert_actions("push_to_zone", seed=3)  # (N, 8); contact: the arm pushes a cube
        assert peer.call(peer.sim_reset_client, Reset.Request(task="push_to_zone", seed=3)).success
        peer.reset_controller()  # also clears the following-error peak the sim's reset jump left
        with peer.lock:
            first_report = len(peer.controller_diagnostics)
        peer.wait_for(lambda: peer.task_status.task == "push_to_zone" and not peer.task_status.success, "new episode")
        t0 = time.monotonic()
        for k in range(len(actions) + 20):
            chunk = actions[min(k, len(actions) - 1):][:16]  # (<=16, 8)
            chunk = np.vstack([chunk, np.tile(actions[-1], (16 - len(chunk), 1))])  # (16, 8)
            peer.publish_chunk(chunk, sequence_id=k + 1, dt_s=0.1)
            if peer.task_status.success:
                break
            time.sleep(max(0.0, t0 + (k + 1) * 0.1 - time.monotonic()))
        peer.wait_for(lambda: peer.task_status.success, "push_to_zone to succeed in the sim", 5.0)
        status = peer.wait_status(lambda s: True, "controller status")
        assert status.chunks_rejected == 0
        # the simulated arm keeps within the following-error limit (default 0.3 rad) of the stream
        n = len(peer.controller_diagnostics)
        peer.wait_for(lambda: len(peer.controller_diagnostics) > n, "the controller's next /diagnostics", 5.0)
        with peer.lock:
            reports = peer.controller_diagnostics[first_report:]
        peak = max(float(d["following_error_peak"]) for d in reports)
        print(f"sim arm following error over the episode, peak of {len(reports)} reports: {peak:.4f} rad")
        assert not any(d["following_error_fault"] for d in reports) and 0.0 < peak < 0.3
    finally:
        peer.close()
        codes = [_stop(ctl, tmp_path / "controller.log"), _stop(sim, tmp_path / "sim.log")]
    assert codes == [0, 0], f"exit codes {codes}:\n{_log_tails(tmp_path / 'controller.log', tmp_path / 'sim.log')}"
