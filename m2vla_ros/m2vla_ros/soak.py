"""``m2vla soak``: run the graph under sustained load and report whether it stays bounded.

Starts perception, policy and controller from the shared graph spec (``sim:=false``: this
process plays the arm, so the camera can be any size) and, for ``--minutes N``, drives them
like a busy cell: camera frames at ``--camera-hz`` (default 60 Hz, 1280x720 rgb8), an
instruction flood at ``--instruction-hz`` (default 100 Hz), /joint_states at 100 Hz that
follow the controller's commands (a perfect position-controlled arm). It prints one JSON
object (also written to ``--json``):

- ``warmup``: whether a chunk came through the whole path before measuring began, and how
  long that took (the window starts anyway after ``--warmup`` seconds; the perception counters
  and its last status then say where the path stopped);
- ``rss_mb``: resident memory per node at the start of the measured window (after warm-up),
  at the end, and the maximum seen, so a leak shows as growth that does not level off;
- ``queues``: depth of every subscription queue (QoS keep-last) and newest-wins evidence
  (frames perception skipped because a newer one had arrived; nothing piles up);
- ``controller``: command rate and p99 period error as the controller reports them, and the
  command rate this process received;
- ``exceptions``: tracebacks in node logs, ``internal`` rejections (guarded callback
  exceptions), nodes that died. ``ok`` is false when any of these is non-zero;
- ``start_failures``: graph starts that did not come up within ``--ready-timeout`` before one
  did (``--start-attempts``, default 2); each one's logs and stacks stay in
  ``logs.failed_start_N``. Only the last attempt's failure ends the soak.

Large frames need Fast DDS's large-data transport (shared memory + TCP): unless
``FASTDDS_BUILTIN_TRANSPORTS`` is already set, it is set to ``LARGE_DATA`` for every process
(the default UDP transport drops most fragmented best-effort frames of this size).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

SOAK_DOMAIN_BASE = 200
QOS_DEPTHS = {  # subscription queues of the graph (qos.py): keep-last depths bound every queue
    "/camera/image_raw (perception)": "SENSOR", "/m2vla/instruction (perception)": "INSTRUCTION",
    "/m2vla/feature_contract (perception)": "LATCHED", "/m2vla/features (policy)": "FEATURES",
    "/joint_states (policy, controller)": "SENSOR", "/m2vla/action_chunk (controller)": "CHUNKS",
    "/m2vla/estop (policy, controller)": "ESTOP",
}
INSTRUCTIONS = ("pick up the red cube", "push the blue cube to the green zone", "stack the red cube on the blue one",
                "reach above the green cube", "place the red cube on the zone")
ARM_JOINTS = [f"panda_joint{i}" for i in range(1, 8)]
FINGERS = ["panda_finger_joint1", "panda_finger_joint2"]
HOME = [0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785]
TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.MULTILINE)


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process [MiB] from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class SoakDriver:
    """The cell around the graph: camera, operator flooding instructions, the arm; and monitors."""

    def __init__(self, context, *, width: int, height: int, trajectory_topic: str) -> None:
        import numpy as np
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from m2vla_msgs.msg import ActionChunk, ControllerStatus, PolicyStatus
        from m2vla_ros import qos
        from m2vla_ros.conversions import diagnostic_values

        self.node = Node("m2vla_soak_driver", context=context)
        self.lock = threading.Lock()
        self.arm = list(HOME)
        self.counts = {"frames_sent": 0, "instructions_sent": 0, "joint_states_sent": 0, "commands_received": 0,
                       "chunks_received": 0}
        self.controller_status: list = []  # (t, ControllerStatus)
        self.policy_status = None
        self.diagnostics: dict = {}  # node name -> {"message": ..., key: value}
        self.command_times: list[float] = []
        n = self.node
        self.image_pub = n.create_publisher(Image, "/camera/image_raw", qos.SENSOR_PUB)
        self.instruction_pub = n.create_publisher(String, "/m2vla/instruction", qos.INSTRUCTION)
        self.joint_pub = n.create_publisher(JointState, "/joint_states", qos.SENSOR_PUB)
        self._JointState, self._String, self._diagnostic_values = JointState, String, diagnostic_values
        n.create_subscription(JointTrajectory, trajectory_topic, self._on_trajectory, qos.COMMANDS)
        n.create_subscription(ActionChunk, "/m2vla/action_chunk", self._on_chunk, qos.CHUNKS)
        n.create_subscription(ControllerStatus, "/m2vla/controller_status", self._on_controller, qos.STATUS)
        n.create_subscription(PolicyStatus, "/m2vla/policy_status", self._on_policy, qos.STATUS)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos.STATUS)
        # a few distinct frames, built once: publishing must cost a stamp update, not a 2.7 MB copy
        rng = np.random.default_rng(0)
        self.frames = []
        for k in range(4):
            rgb = np.zeros((height, width, 3), dtype=np.uint8)  # (H, W, 3)
            rgb[:, :, 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
            rgb[:, :, 1] = np.uint8(60 * k)
            rgb[height // 3: height // 2, width // 3: width // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
            msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3)
            msg.header.frame_id = "soak_camera"
            msg.data = array.array("B", rgb.tobytes())
            self.frames.append(msg)

    # -- monitors
    def _on_trajectory(self, msg) -> None:
        if not msg.points:
            return
        positions = list(msg.points[0].positions)
        with self.lock:
            if len(positions) == 7:
                self.arm = positions
            self.counts["commands_received"] += 1
            self.command_times.append(time.monotonic())

    def _on_chunk(self, _msg) -> None:
        with self.lock:
            self.counts["chunks_received"] += 1

    def _on_controller(self, msg) -> None:
        with self.lock:
            self.controller_status.append((time.monotonic(), msg))

    def _on_policy(self, msg) -> None:
        with self.lock:
            self.policy_status = msg

    def _on_diagnostics(self, msg) -> None:
        with self.lock:
            for status in msg.status:
                self.diagnostics[status.name] = self._diagnostic_values(status)

    def forget_graph(self) -> None:
        """Drop what the last graph said, before a fresh start: its status must not count as ready."""
        with self.lock:
            self.policy_status = None
            self.diagnostics.clear()
            self.controller_status.clear()

    # -- load generators (each on its own thread, absolute deadlines, never bursting)
    def publish_frame(self, k: int) -> None:
        msg = self.frames[k % len(self.frames)]
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.image_pub.publish(msg)
        self.counts["frames_sent"] += 1

    def publish_instruction(self, k: int) -> None:
        self.instruction_pub.publish(self._String(data=f"{INSTRUCTIONS[k % len(INSTRUCTIONS)]} ({k})"))
        self.counts["instructions_sent"] += 1

    def publish_joint_state(self, _k: int) -> None:
        with self.lock:
            arm = list(self.arm)
        msg = self._JointState(name=ARM_JOINTS + FINGERS, position=arm + [0.02, 0.02])
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.joint_pub.publish(msg)
        self.counts["joint_states_sent"] += 1


def run_periodic(stop: threading.Event, rate_hz: float, action, name: str) -> threading.Thread:
    """Call ``action(k)`` at ``rate_hz`` on a monotonic schedule until ``stop`` (missed ticks skipped)."""

    def loop() -> None:
        period = 1.0 / rate_hz
        next_s = time.monotonic()
        k = 0
        while not stop.is_set():
            try:
                action(k)
            except Exception as exc:  # noqa: BLE001 - a generator hiccup is reported, the soak goes on
                print(f"m2vla soak: {name} publish failed: {exc}", file=sys.stderr)
            k += 1
            next_s += period
            delay = next_s - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            elif -delay > period:
                next_s = time.monotonic()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _log_exceptions(log_dir: Path) -> dict[str, int]:
    return {p.stem: len(TRACEBACK.findall(p.read_text(errors="replace"))) for p in sorted(log_dir.glob("*.log"))}


def _start_failure(nodes, driver, timeout_s: float, log_dir: Path) -> str:
    """Why the graph is not up; the live nodes' Python and native stacks go beside their logs in ``log_dir``."""
    from m2vla_ros import node_process

    node_process.request_stack_dumps([r.process for r in nodes.running])  # where a live node is stuck
    for r in nodes.running:  # and where its native threads are (DDS, wait sets), when gdb is here
        if r.process.poll() is None and (stacks := node_process.native_stacks(r.process.pid)):
            (log_dir / f"{r.node.name}.native_stacks.txt").write_text(stacks)
    with driver.lock:
        status = driver.policy_status
        perception = driver.diagnostics.get("m2vla_perception", {}).get("message", "no diagnostics")
        controller = "yes" if driver.controller_status else "none"
    return (f"the graph did not come up in {timeout_s:.0f} s (dead: {nodes.dead()}; policy: "
            f"{status.message if status else 'no status'}; perception: {perception}; controller status: "
            f"{controller})")


def soak(opts: argparse.Namespace, launch_args: dict[str, str]) -> dict:
    """Run the soak; -> the report (see the module docstring)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from m2vla_core.rosenv import ros_environment
    from m2vla_msgs.msg import PolicyStatus
    from m2vla_ros import qos
    from m2vla_ros.bringup import Graph
    from m2vla_ros.demo import perception_ready

    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")  # before rclpy.init: this process too
    env = ros_environment()
    env["ROS_DOMAIN_ID"] = str(opts.domain)
    env["PYTHONUNBUFFERED"] = "1"
    log_dir = Path(opts.out) / "logs"
    nodes = Graph(launch_args, env=env, log_dir=log_dir)
    context = rclpy.Context()
    rclpy.init(args=[], context=context, domain_id=opts.domain)  # not sys.argv: name:=value would become remaps
    driver = SoakDriver(context, width=opts.width, height=opts.height, trajectory_topic=launch_args["controller_topic"])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(driver.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    report: dict = {"ok": False, "config": {
        "duration_s": opts.duration_s, "camera_hz": opts.camera_hz, "image": f"{opts.width}x{opts.height} rgb8",
        "instruction_hz": opts.instruction_hz, "joint_state_hz": 100.0, "launch_args": launch_args,
        "dds_transports": os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", ""),
        "stale_dds_shm_files_removed": 0}, "start_failures": []}
    try:
        threads.append(run_periodic(stop, 100.0, driver.publish_joint_state, "joint-states"))
        def policy_ready() -> bool:
            return driver.policy_status is not None and driver.policy_status.state != PolicyStatus.STATE_ERROR

        for attempt in range(1, opts.start_attempts + 1):
            nodes.start()  # first removes dead processes' Fast DDS files
            report["config"]["stale_dds_shm_files_removed"] += nodes.stale_shm_files_removed
            ready = _wait(lambda: (policy_ready() and perception_ready(driver.diagnostics.get("m2vla_perception", {}))
                                   and driver.controller_status) or bool(nodes.dead()), opts.ready_timeout_s)
            if ready and not nodes.dead():
                break
            failure = _start_failure(nodes, driver, opts.ready_timeout_s, log_dir)
            if attempt == opts.start_attempts:
                raise RuntimeError(f"{failure}; logs in {log_dir}")
            # Seen in CI (2026-11-26): every node idle and healthy, one pair of DDS participants
            # never exchanging samples for 240 s. The evidence is kept and the graph started afresh.
            nodes.stop()
            kept = log_dir.with_name(f"{log_dir.name}.failed_start_{attempt}")
            shutil.rmtree(kept, ignore_errors=True)  # an earlier soak's, in the same --out
            log_dir.rename(kept)
            report["start_failures"].append(f"{failure}; logs in {kept}")
            driver.forget_graph()
            nodes = Graph(launch_args, env=env, log_dir=log_dir)
        pids = {r.node.name: r.process.pid for r in nodes.running}
        threads.append(run_periodic(stop, opts.camera_hz, driver.publish_frame, "camera"))
        threads.append(run_periodic(stop, opts.instruction_hz, driver.publish_instruction, "instructions"))
        t_warmup = time.monotonic()
        live = _wait(lambda: driver.counts["chunks_received"] > 0, opts.warmup_s)  # the whole path is live
        report["warmup"] = {"path_live": live, "seconds": round(time.monotonic() - t_warmup, 1)}
        time.sleep(min(2.0, opts.warmup_s))
        rss_start = {name: rss_mb(pid) for name, pid in pids.items()}
        rss_max = dict(rss_start)
        with driver.lock:
            counts_start = dict(driver.counts)
            diag_start = {k: dict(v) for k, v in driver.diagnostics.items()}
        t_start = time.monotonic()
        t_end = t_start + opts.duration_s
        next_print = t_start + 60.0
        while time.monotonic() < t_end and not nodes.dead():
            time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
            for name, pid in pids.items():
                value = rss_mb(pid)
                if value is not None:
                    rss_max[name] = max(rss_max[name] or 0.0, value)
            if time.monotonic() >= next_print:
                next_print += 60.0
                print(f"m2vla soak: {time.monotonic() - t_start:.0f} s, RSS "
                      + ", ".join(f"{n} {rss_mb(p) or 0:.0f} MiB" for n, p in pids.items()), file=sys.stderr, flush=True)
        elapsed = time.monotonic() - t_start
        rss_end = {name: rss_mb(pid) for name, pid in pids.items()}
        for name, value in rss_end.items():  # the end sample is a sample too: max >= end by construction
            if value is not None:
                rss_max[name] = max(rss_max[name] or 0.0, value)
        with driver.lock:
            counts_end = dict(driver.counts)
            diag_end = {k: dict(v) for k, v in driver.diagnostics.items()}
            statuses = [m for t, m in driver.controller_status if t_start <= t <= t_start + elapsed]
            commands = [t for t in driver.command_times if t >= t_start]
        dead = nodes.dead()
    finally:
        stop.set()
        for thread in threads:  # no publisher may still be inside rclpy when the context goes away
            thread.join(timeout=5.0)
        nodes.stop()
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=5.0)
        driver.node.destroy_node()
        rclpy.try_shutdown(context=context)

    def delta(name: str, key: str) -> int:
        return int(diag_end.get(name, {}).get(key, 0)) - int(diag_start.get(name, {}).get(key, 0))

    internal = {f"{name}/{key}": int(value) for name, values in diag_end.items() for key, value in values.items()
                if key.endswith(":internal")}
    rates = [s.command_rate_hz for s in statuses if s.command_rate_hz > 0]
    errors = [s.period_error_p99_ms for s in statuses if s.command_rate_hz > 0]
    received_hz = (len(commands) - 1) / (commands[-1] - commands[0]) if len(commands) > 1 else 0.0
    tracebacks = _log_exceptions(log_dir)
    sent = {k: counts_end[k] - counts_start[k] for k in counts_end}
    report.update({
        "measured_s": round(elapsed, 1),
        "rss_mb": {name: {"start": _r(rss_start[name]), "end": _r(rss_end[name]), "max": _r(rss_max[name]),
                          "growth": _r((rss_end[name] or 0) - (rss_start[name] or 0)) if rss_end[name] else None}
                   for name in pids},
        "traffic": {**{k: v for k, v in sent.items()}, **{f"{k}_per_s": round(v / elapsed, 1) for k, v in sent.items()}},
        "perception": {"frames_received": delta("m2vla_perception", "frames"),
                       "frames_skipped_newest_wins": delta("m2vla_perception", "frames_skipped"),
                       "frames_rejected": delta("m2vla_perception", "frames_rejected"),
                       "instructions_accepted": delta("m2vla_perception", "instructions"),
                       "features_published": delta("m2vla_perception", "features_published"),
                       "frames_too_old": delta("m2vla_perception", "frames_too_old"),
                       "status_at_end": diag_end.get("m2vla_perception", {}).get("message", ""),
                       "backbone_errors": delta("m2vla_perception", "backbone_errors")},
        "policy": {"chunks_published": delta("m2vla_policy", "chunks_published"),
                   "inputs_rejected": delta("m2vla_policy", "rejected_total")},
        "queues": {topic: {"profile": profile, "history": "keep_last", "depth": getattr(qos, profile).depth}
                   for topic, profile in QOS_DEPTHS.items()},
        "controller": {"nominal_hz": 250.0, "reported_rate_hz_min": _r(min(rates)) if rates else None,
                       "reported_rate_hz_mean": _r(statistics.fmean(rates)) if rates else None,
                       "period_error_p99_ms_max": _r(max(errors)) if errors else None,
                       "received_rate_hz": _r(received_hz),
                       "chunks_accepted": delta("m2vla_controller", "chunks_accepted"),
                       "chunks_rejected": delta("m2vla_controller", "chunks_rejected")},
        "exceptions": {"log_tracebacks": tracebacks, "internal_rejections": internal, "dead_nodes": dead},
    })
    report["ok"] = not dead and not any(tracebacks.values()) and not any(internal.values())
    return report


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def main(argv: list[str]) -> int:
    from m2vla_ros import graph

    parser = argparse.ArgumentParser(prog="m2vla soak", description=__doc__.splitlines()[0])
    parser.add_argument("launch_args", nargs="*", help="bringup arguments, name:=value (sim and rviz are forced off)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="measured duration [min] (default 5)")
    length.add_argument("--seconds", type=float, default=None, help="measured duration [s] (short runs, tests)")
    parser.add_argument("--camera-hz", type=float, default=60.0, help="[Hz] camera frame rate")
    parser.add_argument("--width", type=int, default=1280, help="[px] camera width")
    parser.add_argument("--height", type=int, default=720, help="[px] camera height")
    parser.add_argument("--instruction-hz", type=float, default=100.0, help="[Hz] instruction flood rate")
    parser.add_argument("--warmup", type=float, default=60.0, dest="warmup_s",
                        help="[s] at most this long waiting for the first chunk before measuring")
    parser.add_argument("--ready-timeout", type=float, default=240.0, dest="ready_timeout_s",
                        help="[s] for the graph to come up")
    parser.add_argument("--start-attempts", type=int, default=2,
                        help="graph starts before giving up; a failed start is kept in the report and its logs")
    parser.add_argument("--domain", type=int, default=None, help="ROS_DOMAIN_ID (default: from the pid, 200..221)")
    parser.add_argument("--out", type=Path, default=Path("out/soak"), help="node logs and soak.json go here")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    opts = parser.parse_args(argv)
    opts.duration_s = opts.seconds if opts.seconds is not None else 60.0 * (opts.minutes if opts.minutes else 5.0)
    checks = {"duration": opts.duration_s > 0, "camera-hz": 0 < opts.camera_hz <= 1000,
              "instruction-hz": 0 < opts.instruction_hz <= 10000, "width": 8 <= opts.width <= 8192,
              "height": 8 <= opts.height <= 8192, "start-attempts": opts.start_attempts >= 1}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        print(f"m2vla soak: invalid --{', --'.join(bad)}", file=sys.stderr)
        return 2
    if opts.domain is None:
        opts.domain = SOAK_DOMAIN_BASE + os.getpid() % 22
    try:
        launch_args = graph.parse_arguments([*opts.launch_args, "sim:=false", "rviz:=false"])
    except ValueError as exc:
        print(f"m2vla soak: {exc}", file=sys.stderr)
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        report = soak(opts, launch_args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"m2vla soak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2vla soak: interrupted", file=sys.stderr)
        return 130
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    for path in (opts.out / "soak.json", opts.json):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
    rss = ", ".join(f"{n} {v['start']}->{v['end']} MiB" for n, v in report["rss_mb"].items())
    print(f"m2vla soak: {'OK' if report['ok'] else 'PROBLEMS'} over {report['measured_s']} s; RSS {rss}; controller "
          f"{report['controller']['reported_rate_hz_mean']} Hz (p99 period error max "
          f"{report['controller']['period_error_p99_ms_max']} ms)", file=sys.stderr)
    return 0 if report["ok"] else 1
