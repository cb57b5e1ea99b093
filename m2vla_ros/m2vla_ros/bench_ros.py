"""ROS-path and controller measurements of ``m2vla bench``, across real processes.

Starts the node graph (sim, perception, policy, controller) exactly as ``m2vla bringup`` does,
drives it from this process as an operator's client, and times what crosses the wire:

- camera frame -> features -> chunk -> first command: per chunk, from the camera stamp the
  chunk carries (``observation_stamp``) to the receipt of the features, the chunk and the
  first command after it; all processes stamp with the same system clock;
- instruction -> first chunk / first command: a new, never-seen instruction (cold prefix
  cache) is published and timed to the first chunk answering it and the command after it;
- the controller's command stream at 250 Hz (while the trials run, padded to the duration)
  and, after restarting only the controller with ``command_rate_hz: 500``, at 500 Hz; the
  period is read from the command header stamps (taken by the controller right before each
  publish), so subscriber-side delays do not count; receipt-time jitter is reported beside.

``python -m m2vla_ros.bench_ros --json OUT.json --policy DIR [--trials N] [--controller-seconds S]``
(normally started by ``m2vla bench`` in a child with the ROS environment).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sensor_msgs.msg import JointState

from m2vla_msgs.msg import ActionChunk, ControllerStatus, LayerFeatures
from m2vla_ros import graph
from m2vla_ros.bringup import Graph
from m2vla_ros.demo import DemoClient, wait_until_ready

ON_TIME_TOLERANCE_S = 1e-3  # same tolerance as m2vla_core.control.PeriodMonitor
# Our own subscriptions queue deeply so a busy client never drops a stamp it should time.
RECORD_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown")
_OBJECTS = ("cube", "block", "bowl", "cup", "plate", "bottle", "ball", "can")


def instruction_text(i: int) -> str:
    """A distinct instruction per trial, so each one misses perception's prefix cache."""
    return (f"pick up the {_COLOURS[i % len(_COLOURS)]} {_OBJECTS[(i // len(_COLOURS)) % len(_OBJECTS)]} "
            f"and place it on the {_COLOURS[(i + 3) % len(_COLOURS)]} tray {'slowly' if i // 80 % 2 else 'now'}")


def _stamp_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class BenchClient(DemoClient):
    """The demo client plus recorders of features, chunks and commands with their stamps."""

    def __init__(self, *, context=None) -> None:
        super().__init__(context=context)
        self.rec_lock = threading.Lock()
        self.features: list[tuple[float, float, int, float]] = []  # (receipt wall s, camera stamp s, instruction_id, compute ms)
        self.chunks: list[tuple[float, float, int]] = []  # (receipt wall s, observation stamp s, instruction_id)
        self.commands: list[tuple[float, float]] = []  # (receipt wall s, header stamp s)
        self.controller_status: ControllerStatus | None = None
        self.loop_timing: list[tuple[float, float, float]] = []  # (receipt wall s, rate Hz, period error p99 ms)
        self.features_message_bytes = 0
        self.create_subscription(LayerFeatures, "/m2vla/features", self._rec_features, RECORD_QOS)
        self.create_subscription(ActionChunk, "/m2vla/action_chunk", self._rec_chunk, RECORD_QOS)
        self.create_subscription(JointState, "/m2vla/joint_command", self._rec_command, RECORD_QOS)
        self.create_subscription(ControllerStatus, "/m2vla/controller_status", self._rec_status, RECORD_QOS)

    def _rec_features(self, msg: LayerFeatures) -> None:
        now = time.time()
        if not self.features_message_bytes:
            self.features_message_bytes = len(serialize_message(msg))
        with self.rec_lock:
            self.features.append((now, _stamp_s(msg.header.stamp), int(msg.instruction_id), float(msg.compute_ms)))

    def _rec_chunk(self, msg: ActionChunk) -> None:
        now = time.time()
        with self.rec_lock:
            self.chunks.append((now, _stamp_s(msg.observation_stamp), int(msg.instruction_id)))

    def _rec_command(self, msg: JointState) -> None:
        now = time.time()
        with self.rec_lock:
            self.commands.append((now, _stamp_s(msg.header.stamp)))

    def _rec_status(self, msg: ControllerStatus) -> None:
        with self.rec_lock:
            self.controller_status = msg
            if msg.command_rate_hz > 0:  # heartbeat with the loop's own PeriodMonitor window
                self.loop_timing.append((time.time(), float(msg.command_rate_hz), float(msg.period_error_p99_ms)))

    def loop_report(self, t0: float, t1: float) -> dict:
        """The controller's own view (wake-up times of its loop, ~0.2 s windows): worst and median window p99."""
        with self.rec_lock:
            rows = [r for r in self.loop_timing if t0 <= r[0] <= t1]
        p99 = [r[2] for r in rows]
        return {"loop_windows_count": len(rows),
                "loop_period_error_p99_median_window_ms": float(np.median(p99)) if p99 else float("nan"),
                "loop_period_error_p99_worst_window_ms": float(np.max(p99)) if p99 else float("nan")}

    def snapshot(self) -> tuple[list, list, np.ndarray]:
        with self.rec_lock:
            return list(self.features), list(self.chunks), np.array(self.commands, dtype=np.float64).reshape(-1, 2)  # (N, [receipt, stamp])


def percentiles_ms(values_s, prefix: str) -> dict[str, float]:
    x = np.asarray(values_s, dtype=np.float64) * 1e3
    if x.size == 0:
        return {f"{prefix}_p50_ms": float("nan"), f"{prefix}_p99_ms": float("nan"), f"{prefix}_count": 0}
    return {f"{prefix}_p50_ms": float(np.percentile(x, 50)), f"{prefix}_p99_ms": float(np.percentile(x, 99)),
            f"{prefix}_count": int(x.size)}


def command_timing(commands: np.ndarray, t0: float, t1: float, rate_hz: float) -> dict:
    """Rate, period error and on-time fraction of commands received in wall window [t0, t1]."""
    rows = commands[(commands[:, 0] >= t0) & (commands[:, 0] <= t1)]
    period = 1.0 / rate_hz
    out: dict = {"nominal_rate_hz": rate_hz, "duration_s": float(t1 - t0), "commands_count": int(len(rows))}
    if len(rows) < 3:
        return {**out, "achieved_rate_hz": 0.0, "period_error_p50_ms": float("nan"), "period_error_p99_ms": float("nan"),
                "on_time_fraction": 0.0, "missed_periods_count": 0, "receive_period_error_p99_ms": float("nan")}
    stamps = np.sort(rows[:, 1])
    periods = np.diff(stamps)  # (N-1,) controller-side periods
    errors = np.abs(periods - period)
    receive = np.diff(rows[:, 0])
    span = stamps[-1] - stamps[0]
    return {**out, "achieved_rate_hz": float(periods.size / span) if span > 0 else 0.0,
            "period_error_p50_ms": float(np.percentile(errors, 50) * 1e3),
            "period_error_p99_ms": float(np.percentile(errors, 99) * 1e3),
            "period_error_max_ms": float(errors.max() * 1e3),
            "on_time_fraction": float(np.mean(errors <= ON_TIME_TOLERANCE_S)),
            "missed_periods_count": int(np.sum(np.maximum(0, np.round(periods / period) - 1))),
            "receive_period_error_p99_ms": float(np.percentile(np.abs(receive - period), 99) * 1e3)}


def frame_path(features: list, chunks: list, commands: np.ndarray, t0: float, t1: float) -> dict:
    """camera stamp -> features receipt, -> chunk receipt, -> first command received after the chunk."""
    feats = [f for f in features if t0 <= f[0] <= t1]
    chs = [c for c in chunks if t0 <= c[0] <= t1]
    receipt = np.sort(commands[:, 0]) if len(commands) else np.zeros(0)
    first_cmd = []
    for t_chunk, stamp, _ in chs:
        i = np.searchsorted(receipt, t_chunk)
        if i < receipt.size:
            first_cmd.append(receipt[i] - stamp)
    return {**percentiles_ms([f[0] - f[1] for f in feats], "frame_to_features"),
            **percentiles_ms([f[3] * 1e-3 for f in feats if f[3] > 0], "perception_compute"),
            **percentiles_ms([t - s for t, s, _ in chs], "frame_to_chunk"),
            **percentiles_ms(first_cmd, "frame_to_first_command")}


def instruction_trials(client: BenchClient, n: int, timeout_s: float, first: int = 0) -> dict[str, list[float]]:
    """Publish n new instructions one after the other; -> seconds from the publish to the first
    features, first chunk and first command answering each ("features", "chunk", "command")."""
    from std_msgs.msg import String

    import random

    gap = random.Random(first)  # seeded: the same schedule every run
    out: dict[str, list[float]] = {"features": [], "chunk": [], "command": [], "compute": []}
    for i in range(first, first + n):
        features, chunks, _ = client.snapshot()
        last_id = max((x[2] for x in features + chunks), default=0)
        t_pub = time.time()
        client.instruction_pub.publish(String(data=instruction_text(i)))
        deadline = time.monotonic() + timeout_s
        t_feat = t_chunk = t_cmd = None
        while time.monotonic() < deadline and t_cmd is None:
            time.sleep(0.002)
            features, chunks, commands = client.snapshot()
            if t_feat is None:
                new = [f for f in features if f[2] > last_id and f[0] >= t_pub]
                t_feat, compute_ms = (new[0][0], new[0][3]) if new else (None, 0.0)
            if t_chunk is None:
                new = [c[0] for c in chunks if c[2] > last_id and c[0] >= t_pub]
                t_chunk = new[0] if new else None
            if t_chunk is not None:
                after = commands[commands[:, 0] >= t_chunk, 0]
                t_cmd = float(after.min()) if after.size else None
        if t_feat is None or t_chunk is None or t_cmd is None:
            print(f"bench_ros: trial {i}: no features/chunk/command within {timeout_s:.0f} s", file=sys.stderr, flush=True)
            continue
        out["features"].append(t_feat - t_pub)
        out["compute"].append(compute_ms * 1e-3)
        out["chunk"].append(t_chunk - t_pub)
        out["command"].append(t_cmd - t_pub)
        # Let a few chunks of this instruction flow; the random part spreads the publish times over
        # the policy's timer phase (a fixed gap locks onto it and always measures the same wait).
        time.sleep(gap.uniform(0.3, 0.4))
    return out


def save_commands(log_dir: Path | None, name: str, commands: np.ndarray, t0: float, t1: float) -> None:
    """Raw (receipt wall s, header stamp s) rows of a window, for plots and later analysis."""
    if log_dir is None:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = commands[(commands[:, 0] >= t0) & (commands[:, 0] <= t1)]
    np.savetxt(log_dir / name, rows, fmt="%.9f", delimiter=",", header="receipt_wall_s,stamp_s", comments="")


def restart_controller(running: Graph, args: dict[str, str], env: dict, log_dir: Path | None, rate_hz: float) -> Graph:
    """Stop only the controller process and start it again with another command rate."""
    ctrl = next(r for r in running.running if r.node.name == "m2vla_controller")
    ctrl.process.send_signal(signal.SIGINT)
    try:
        ctrl.process.wait(timeout=10.0)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: force it
        ctrl.process.kill()
        ctrl.process.wait(timeout=5.0)
    second = Graph(args, env=env, log_dir=None if log_dir is None else log_dir / f"controller_{rate_hz:.0f}hz")
    node = ctrl.node
    second.nodes = [replace(node, overrides={**node.overrides, "command_rate_hz": float(rate_hz)})]
    second.start()
    return second


def set_realtime(process, priority: int) -> int:
    """SCHED_FIFO ``priority`` on every thread of a node process (an experiment: what a real-time
    command thread would buy on a loaded machine); -> threads changed. Needs CAP_SYS_NICE."""
    import os

    changed = 0
    for tid in os.listdir(f"/proc/{process.pid}/task"):
        os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(priority))
        changed += 1
    return changed


def wait_for_commands(client: BenchClient, since: float, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, _, commands = client.snapshot()
        if np.sum(commands[:, 0] >= since) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {n} commands within {timeout_s:.0f} s")


def run(policy: str, trials: int, controller_s: float, log_dir: Path | None, rt_priority: int = 0) -> dict:
    import os

    from std_msgs.msg import String

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    args = graph.parse_arguments(["sim:=true", "rviz:=false", f"policy:={policy}"])
    rclpy.init()
    client = BenchClient()
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    running = Graph(args, env=env, log_dir=log_dir)
    second: Graph | None = None
    result: dict = {"policy": policy or "shipped", "errors": []}
    try:
        t_start = time.monotonic()
        running.start()
        wait_until_ready(client, 240.0)
        result["graph_ready_s"] = time.monotonic() - t_start
        # Warm-up (untimed): perception may still be loading its backbone when the policy is ready,
        # and every process's first forward pass is slow.
        warm = instruction_trials(client, 1, 120.0, first=1000)["chunk"]
        if not warm:
            raise TimeoutError("no chunk answered the warm-up instruction within 120 s")
        result["warmup_instruction_to_first_chunk_s"] = warm[0]
        if rt_priority:
            result["controller_rt_threads_count"] = set_realtime(
                next(r.process for r in running.running if r.node.name == "m2vla_controller"), rt_priority)
        # Phase 1, 250 Hz: instruction trials; the command stream is timed over the same window.
        t0 = time.time()
        timed = instruction_trials(client, trials, 30.0)
        remaining = controller_s - (time.time() - t0)
        if remaining > 0:
            time.sleep(remaining)
        t1 = time.time()
        features, chunks, commands = client.snapshot()
        ros_path = {"trials_count": trials, **percentiles_ms(timed["features"], "instruction_to_features"),
                    **percentiles_ms(timed["compute"], "instruction_perception_compute"),
                    **percentiles_ms(timed["chunk"], "instruction_to_first_chunk"),
                    **percentiles_ms(timed["command"], "instruction_to_first_command"),
                    "instruction_to_first_command_samples_ms": [x * 1e3 for x in timed["command"]],
                    **frame_path(features, chunks, commands, t0, t1),
                    "features_message_bytes": client.features_message_bytes}
        with client.rec_lock:
            status = client.controller_status
        c250 = command_timing(commands, t0, t1, 250.0)
        save_commands(log_dir, "commands_250hz.csv", commands, t0, t1)
        c250.update(client.loop_report(t0, t1))
        c250["chunks_accepted_count"] = int(status.chunks_accepted) if status else 0
        c250["chunks_rejected_count"] = int(status.chunks_rejected) if status else 0
        # Phase 2, 500 Hz: only the controller restarts; the rest keeps running the last instruction.
        second = restart_controller(running, args, env, log_dir, 500.0)
        t_restart = time.time()
        wait_for_commands(client, t_restart, 200, 60.0)
        if rt_priority:
            set_realtime(second.running[0].process, rt_priority)
        client.instruction_pub.publish(String(data=instruction_text(trials)))
        t2 = time.time()
        time.sleep(controller_s)
        t3 = time.time()
        _, _, commands = client.snapshot()
        c500 = command_timing(commands, t2, t3, 500.0)
        save_commands(log_dir, "commands_500hz.csv", commands, t2, t3)
        c500.update(client.loop_report(t2, t3))
        dead = [d for d in running.dead() if d[0] != "m2vla_controller"] + second.dead()
        if dead:
            result["errors"].append(f"node(s) died: {dead}")
        result.update({"ros_path": ros_path, "controller_250hz": c250, "controller_500hz": c500})
    except (TimeoutError, RuntimeError, StopIteration) as exc:
        result["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if second is not None:
            second.stop()
        running.stop()
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=5.0)  # a daemon spin thread killed at exit aborts in C++ ("terminate called ...")
        client.destroy_node()
        rclpy.try_shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2vla_ros.bench_ros", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the measurements here")
    parser.add_argument("--policy", default="", help="head checkpoint dir; empty = the shipped policy")
    parser.add_argument("--trials", type=int, default=20, help="instructions to time")
    parser.add_argument("--controller-seconds", type=float, default=30.0, help="[s] command stream window per rate")
    parser.add_argument("--log-dir", type=Path, default=None, help="node logs")
    parser.add_argument("--controller-rt-priority", type=int, default=0,
                        help="experiment: SCHED_FIFO priority (1-99) for the controller process; 0 = as shipped")
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if opts.trials < 1 or opts.controller_seconds <= 0:
        print("bench_ros: --trials must be >= 1 and --controller-seconds > 0", file=sys.stderr)
        return 2
    result = run(opts.policy, opts.trials, opts.controller_seconds, opts.log_dir, opts.controller_rt_priority)
    result["controller_rt_priority_count"] = opts.controller_rt_priority
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for err in result["errors"]:
        print(f"bench_ros: {err}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
