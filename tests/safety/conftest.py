"""The m2vla graph as real processes for the safety tests, and the operator-side client.

One graph per test session (sim + perception + policy + controller, started from the shared
spec exactly as ``m2vla bringup`` does) with a random-weight head built for the shipped tiny
backbone. Modules run in name order: bad input first (nothing may move), then the fault tests
(which kill and restart nodes and leave the graph whole again).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from safety_support import TEST_FRAME, build_random_policy, safety_domain_id  # tests/safety is on sys.path

READY_TIMEOUT_S = 240.0  # the first start imports torch + transformers in three processes on 2 shared cores


@pytest.fixture(scope="session")
def random_policy(tmp_path_factory) -> Path:
    return build_random_policy(tmp_path_factory.mktemp("policy") / "random_head")


@dataclass
class Recorder:
    """Everything the client saw, with monotonic receipt times; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    commands: list = field(default_factory=list)  # (t, stamp_s, (8,) command)
    chunks: list = field(default_factory=list)  # (t, sequence_id, header stamp [s])
    controller_status: list = field(default_factory=list)  # (t, ControllerStatus)
    policy_status: list = field(default_factory=list)  # (t, PolicyStatus)
    diagnostics: dict = field(default_factory=dict)  # node name -> (t, {key: value})
    sim_joints: list = field(default_factory=list)  # (t, (8,) measured arm + gripper opening)


class SafetyClient:
    """Operator-side rclpy node on its own context, spun in a thread."""

    def __init__(self, domain: int) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import JointState

        from m2vla_core.control import PANDA_JOINT_NAMES
        from m2vla_msgs.msg import ActionChunk, ControllerStatus, PolicyStatus
        from m2vla_ros import qos
        from m2vla_ros.conversions import diagnostic_values, joint_state_to_array

        self.names = list(PANDA_JOINT_NAMES)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = Node("m2vla_safety_client", context=self.context)
        self.rec = Recorder()
        rec = self.rec

        def on_command(msg):
            if msg.header.frame_id == TEST_FRAME:
                return  # a bad command this test published itself, not the controller's
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            q = joint_state_to_array(msg, self.names)
            with rec.lock:
                rec.commands.append((time.monotonic(), stamp, q))

        def on_chunk(msg):
            if msg.header.frame_id == TEST_FRAME:
                return
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9  # when the policy computed it
            with rec.lock:
                rec.chunks.append((time.monotonic(), int(msg.sequence_id), stamp))

        def on_controller(msg):
            with rec.lock:
                rec.controller_status.append((time.monotonic(), msg))

        def on_policy(msg):
            with rec.lock:
                rec.policy_status.append((time.monotonic(), msg))

        def on_diagnostics(msg):
            with rec.lock:
                for status in msg.status:
                    rec.diagnostics[status.name] = (time.monotonic(), diagnostic_values(status))

        def on_joints(msg):
            try:
                q = joint_state_to_array(msg, self.names)
            except ValueError:
                return  # the bad joint states this test publishes itself
            with rec.lock:
                rec.sim_joints.append((time.monotonic(), q))

        # A recorder must not lose what it records when its Python thread is descheduled on a loaded
        # machine: DDS keeps up to 1000 samples for it (the nodes' own queues stay keep-last 1).
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        record = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)
        n = self.node
        n.create_subscription(JointState, "/m2vla/joint_command", on_command, record)
        n.create_subscription(ActionChunk, "/m2vla/action_chunk", on_chunk, record)
        n.create_subscription(ControllerStatus, "/m2vla/controller_status", on_controller, record)
        n.create_subscription(PolicyStatus, "/m2vla/policy_status", on_policy, record)
        n.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, qos.STATUS)
        n.create_subscription(JointState, "/joint_states", on_joints, qos.SENSOR)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    # -- queries
    def commands_since(self, t: float, *, stamped: bool = False) -> np.ndarray:
        with self.rec.lock:
            rows = [np.r_[stamp, q] if stamped else q for tc, stamp, q in self.rec.commands if tc >= t]
        return np.array(rows).reshape(-1, len(self.names) + int(stamped))

    def commands_stamped_after(self, stamp_s: float, *, stamped: bool = False) -> np.ndarray:
        """(N, 8) commands the controller stamped after ``stamp_s`` (ROS clock)."""
        with self.rec.lock:
            rows = [np.r_[stamp, q] if stamped else q for _, stamp, q in self.rec.commands if stamp >= stamp_s]
        return np.array(rows).reshape(-1, len(self.names) + int(stamped))

    def describe_commands(self, stamp_s: float) -> str:
        """What the client saw of the command stream around ``stamp_s``, for a failure message: a
        controller that stopped sending and a stream that stopped arriving read differently."""
        with self.rec.lock:
            received = [(tc, stamp) for tc, stamp, _ in self.rec.commands]
        after = [stamp for _, stamp in received if stamp >= stamp_s]
        newest = max((stamp for _, stamp in received), default=float("nan"))
        now = time.monotonic()
        arrived = sum(1 for tc, _ in received if tc >= now - 2.0)
        diag = self.diagnostics("m2vla_controller", now - 2.0) or {}
        status = self.latest("controller_status")
        return (f"{len(received)} commands recorded, {len(after)} stamped after {stamp_s:.3f}, newest stamp "
                f"{newest - stamp_s:+.3f} s from it, {arrived} arrived in the last 2 s; the controller's last "
                f"diagnostics within 2 s: commands={diag.get('commands')} command_rate_hz={diag.get('command_rate_hz')}"
                f"; last status: {status}")

    def chunks_since(self, t: float) -> int:
        """Chunks received after monotonic ``t``."""
        with self.rec.lock:
            return sum(1 for tc, _, _ in self.rec.chunks if tc >= t)

    def now_stamp(self) -> float:
        """This machine's ROS clock [s] (what the nodes stamp messages with)."""
        return self.node.get_clock().now().nanoseconds * 1e-9

    def chunks_computed_after(self, stamp_s: float) -> int:
        """Chunks the policy stamped after ``stamp_s`` (receipt can lag on a loaded machine)."""
        with self.rec.lock:
            return sum(1 for _, _, stamp in self.rec.chunks if stamp >= stamp_s)

    def latest(self, stream: str, since: float = 0.0):
        with self.rec.lock:
            items = [m for tc, m in getattr(self.rec, stream) if tc >= since]
        return items[-1] if items else None

    def diagnostics(self, name: str, since: float = 0.0) -> dict | None:
        with self.rec.lock:
            entry = self.rec.diagnostics.get(name)
        return entry[1] if entry is not None and entry[0] >= since else None

    def counter(self, name: str, key: str, since: float = 0.0) -> int:
        values = self.diagnostics(name, since) or {}
        return int(values.get(key, 0))

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def wait_for_quietly(self, predicate, timeout_s: float) -> bool:
        try:
            self.wait_for(predicate, timeout_s, "")
        except AssertionError:
            return False
        return True

    def call(self, srv_type, name: str, request, timeout_s: float = 60.0):
        from m2vla_ros.demo import call_service

        client = self.node.create_client(srv_type, name)
        try:
            return call_service(client, request, timeout_s)  # TimeoutError names the service
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@dataclass
class SafetyStack:
    graph: object  # m2vla_ros.bringup.Graph
    client: SafetyClient
    env: dict
    log_dir: Path
    policy: Path

    def process(self, name: str) -> subprocess.Popen:
        return next(r.process for r in self.graph.running if r.node.name == name)

    def kill(self, name: str) -> None:
        proc = self.process(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, name: str) -> subprocess.Popen:
        """Start node ``name`` again with the exact command line of the graph spec."""
        from m2vla_ros import graph as spec
        from m2vla_ros.bringup import RunningNode, node_command

        index = next(i for i, r in enumerate(self.graph.running) if r.node.name == name)
        old = self.graph.running[index]
        if old.process.poll() is None:
            raise RuntimeError(f"{name} is still running")
        log = open(self.log_dir / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115 - closed with the process
        log.write(f"\n--- restarted by the test after exit code {old.process.returncode}\n")
        log.flush()
        proc = subprocess.Popen(node_command(old.node, spec.config_dir()), env=self.graph.env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.graph.running[index] = RunningNode(old.node, proc)
        return proc

    def publish_instruction(self, text: str) -> float:
        from std_msgs.msg import String

        from m2vla_ros import qos

        if not hasattr(self, "_instruction_pub"):
            self._instruction_pub = self.client.node.create_publisher(String, "/m2vla/instruction", qos.INSTRUCTION)
        t = time.monotonic()
        self._instruction_pub.publish(String(data=text))
        return t

    def wait_for_motion(self, since: float, chunks: int = 3, timeout_s: float = 90.0) -> None:
        self.client.wait_for(lambda: self.client.chunks_since(since) >= chunks, timeout_s, f"{chunks} chunks")

    released: bool = False
    dead_at_release: list = field(default_factory=list)

    def release(self) -> None:
        """Stop the graph before the session ends (the soak needs the CPU); idempotent."""
        if self.released:
            return
        self.dead_at_release = self.graph.dead()
        self.released = True
        self.graph.stop()
        self.client.close()


_SHARED: dict[str, SafetyStack] = {}


def release_shared_graph() -> None:
    """Stop the session's graph if one runs (for tests that start their own)."""
    stack = _SHARED.pop("stack", None)
    if stack is not None:
        stack.release()


@pytest.fixture
def without_shared_graph():
    release_shared_graph()


@pytest.fixture(scope="session")
def stack(random_policy, tmp_path_factory):
    from m2vla_core.rosenv import ros_environment
    from m2vla_ros import graph
    from m2vla_ros.bringup import Graph
    from m2vla_ros.demo import perception_ready

    domain = safety_domain_id()
    env = ros_environment()
    env["ROS_DOMAIN_ID"] = str(domain)
    env["PYTHONUNBUFFERED"] = "1"
    logs = tmp_path_factory.mktemp("safety_graph_logs")
    # 224 px frames: the random head reads no object positions, and rendering 448 px frames (the
    # shipped policy's localiser input) would only load the 2 shared cores the fault timings run on
    words = ["sim:=true", "rviz:=false", f"policy:={random_policy}", "camera_size:=224"]
    running = Graph(graph.parse_arguments(words), env=env, log_dir=logs)
    client = SafetyClient(domain)
    running.start()
    dead: list = []
    stack_: SafetyStack | None = None
    try:
        client.wait_for(lambda: (client.latest("policy_status") is not None
                                 and client.latest("policy_status").checkpoint == str(random_policy)
                                 and client.latest("controller_status") is not None
                                 and perception_ready(client.diagnostics("m2vla_perception") or {})
                                 and client.diagnostics("m2vla_sim") is not None),
                        READY_TIMEOUT_S, "the graph to come up (policy loaded, controller alive, perception's VLM "
                                         "loaded with the contract, sim alive)")
        stack_ = SafetyStack(running, client, env, logs, random_policy)
        _SHARED["stack"] = stack_
        yield stack_
        dead = stack_.dead_at_release if stack_.released else running.dead()
    finally:
        _SHARED.pop("stack", None)
        if stack_ is None or not stack_.released:
            running.stop()
            client.close()
        for log in sorted(Path(logs).glob("*.log")):  # shown by pytest when a test failed
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
    assert not dead, f"node(s) died during the safety tests: {dead}"
