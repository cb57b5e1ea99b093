"""Controller node: action chunks + /joint_states -> joint commands at the command rate.

Thin over ``m2vla_core.control.ChunkStreamer``: subscriptions convert and validate messages
and hand them to the streamer under a lock; a dedicated thread ticks at ``command_rate_hz``
on the monotonic clock (absolute deadlines, missed ticks skipped, never bursts) so command
timing never waits behind a callback or a service. Output adapter by parameter ``output``:
``sim`` -> sensor_msgs/JointState on ``command_topic``; ``joint_trajectory`` ->
trajectory_msgs/JointTrajectory with one point ``trajectory_lookahead_s`` ahead on
``trajectory_topic`` (ros2_control's joint_trajectory_controller, streaming mode).

Holds on e-stop (latched until ``False`` or ``~/reset``), stale/missing chunks or joint
states, bad data, and an arm that stops following its commands (``max_following_error``,
latched until ``~/reset``); every rejection is logged (throttled) and counted in
/m2vla/controller_status and /diagnostics. Every callback is guarded: an unexpected exception
is counted as an ``<input>:internal`` rejection and the node keeps streaming (holding).
A restarted controller holds the *measured* joint state until a chunk arrives (it has no
command history), so it never replays a stale command.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.subscription import MessageInfo
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from m2vla_core.control import (
    ESTOPPED, HOLD_FOLLOWING_ERROR, PANDA_JOINT_NAMES, PANDA_LIMITS, TRACKING, Chunk, ChunkStreamer, ControllerConfig,
    JointLimits, PeriodMonitor, TickGrid, WorkspaceBox,
)
from m2vla_core.control.config import MAX_ENSEMBLE_CHUNKS, MAX_ENSEMBLE_DECAY
from m2vla_msgs.msg import ActionChunk, ControllerStatus
from m2vla_msgs.srv import Reset, Stop
from m2vla_ros import node_process, qos
from m2vla_ros.conversions import (arrival_monotonic, array_to_joint_state, diagnostic_array,
                                   failed_service_response, guard_callback, joint_state_to_array, msg_to_chunk,
                                   ns_to_stamp, short)
from m2vla_ros.params import declare_parameters

OUTPUTS = ("sim", "joint_trajectory")
STATE_IDS = {"holding": ControllerStatus.STATE_HOLDING, TRACKING: ControllerStatus.STATE_TRACKING,
             ESTOPPED: ControllerStatus.STATE_ESTOP}

PARAMETERS = {
    "output": ("sim", "command adapter: sim (JointState on command_topic) | joint_trajectory (ros2_control)"),
    "command_topic": ("/m2vla/joint_command", "sensor_msgs/JointState commands (output=sim)"),
    "trajectory_topic": ("/joint_trajectory_controller/joint_trajectory",
                         "trajectory_msgs/JointTrajectory topic (output=joint_trajectory)"),
    "trajectory_joint_names": (list(PANDA_JOINT_NAMES[:7]), "joints sent to ros2_control (subset of joint_names)"),
    "trajectory_lookahead_s": (0.02, "[s] time_from_start of the single trajectory point", (0.001, 1.0)),
    "joint_names": (list(PANDA_JOINT_NAMES), "controller joint order; chunks and joint states are matched by name"),
    "position_lower": (list(PANDA_LIMITS.lower), "[rad | m] lower position limit per joint"),
    "position_upper": (list(PANDA_LIMITS.upper), "[rad | m] upper position limit per joint"),
    "velocity_limit": (list(PANDA_LIMITS.velocity), "[rad/s | m/s] max speed per joint"),
    "acceleration_limit": (list(PANDA_LIMITS.acceleration), "[rad/s^2 | m/s^2] max acceleration per joint"),
    "command_rate_hz": (250.0, "[Hz] command stream rate", (1.0, 1000.0)),
    "realtime_priority": (0, "SCHED_FIFO priority of the command thread, 0 = normal scheduling "
                             "(needs CAP_SYS_NICE or an rtprio limit)", (0, 99)),
    "interpolation": ("cubic", "between waypoints: linear | cubic"),
    "blend_s": (0.1, "[s] cross-fade from the commanded position into a new chunk", (0.0, 5.0)),
    "ensemble_chunks": (4, "follow the mean of the newest N chunks that still cover now (temporal ensembling); "
                           "1 = the newest chunk alone", (1, MAX_ENSEMBLE_CHUNKS)),
    "ensemble_decay": (0.7, "weigh those chunks exp(-decay * i), i = 0 for the oldest covering now; 0 = equal "
                            "weights", (0.0, MAX_ENSEMBLE_DECAY)),
    "max_chunk_age_s": (1.0, "[s] refuse chunks whose observation is older on arrival", (0.001, 60.0)),
    "max_future_stamp_s": (0.05, "[s] refuse observation stamps this far in the future", (0.0, 10.0)),
    "chunk_timeout_s": (1.5, "[s] hold when no chunk was accepted for this long", (0.001, 60.0)),
    "max_joint_state_age_s": (0.25, "[s] hold when the newest joint state is older", (0.001, 60.0)),
    "position_tolerance": (0.05, "[rad | m] refuse chunk waypoints beyond limits by more", (0.0, 1.0)),
    "max_chunk_speed_factor": (3.0, "refuse chunks faster than this x velocity limit", (1.0, 100.0)),
    "workspace_check": (True, "keep the end effector in the workspace box (Panda forward kinematics)"),
    "workspace_lower_m": ([-0.2, -0.7, -0.02], "[m] workspace box lower corner in the base frame"),
    "workspace_upper_m": ([0.9, 0.7, 1.2], "[m] workspace box upper corner in the base frame"),
    "max_following_error": (0.3, "[rad | m] hold at the measured position, latched until ~/reset, when a checked "
                                 "joint stays further than this from its command for following_error_time_s "
                                 "(0 = off)", (0.0, 10.0)),
    "following_error_time_s": (0.5, "[s] how long the following error must last to latch the hold", (0.0, 60.0)),
    "following_error_exempt": (["gripper_opening"], "joints the following-error check does not watch (a gripper "
                                                    "closed on an object stays short of its command)"),
    "status_rate_hz": (5.0, "[Hz] /m2vla/controller_status heartbeat (also published on change)", (0.1, 100.0)),
}


class ControllerNode(Node):
    def __init__(self) -> None:
        super().__init__("m2vla_controller")
        self.p = declare_parameters(self, PARAMETERS)
        self.config = self._build_config()
        self.names = list(self.config.joint_names)
        self.streamer = ChunkStreamer(self.config, self._forward_kinematics())
        self.monitor = PeriodMonitor(self.config.period_s)
        self._lock = threading.Lock()  # guards the streamer
        self._timing_lock = threading.Lock()
        self.status = ControllerStatus(state=ControllerStatus.STATE_HOLDING, hold_reason="no_joint_state")

        if self.p["output"] not in OUTPUTS:
            raise ValueError(f"parameter output must be one of {OUTPUTS}, got {self.p['output']!r}")
        if self.p["output"] == "sim":
            self.command_pub = self.create_publisher(JointState, self.p["command_topic"], qos.COMMANDS)
        else:
            missing = [n for n in self.p["trajectory_joint_names"] if n not in self.names]
            twice = sorted({n for n in self.p["trajectory_joint_names"] if self.p["trajectory_joint_names"].count(n) > 1})
            if twice:
                raise ValueError(f"trajectory_joint_names name {twice} more than once")
            if missing:
                raise ValueError(f"trajectory_joint_names {missing} are not in joint_names {self.names}")
            self._trajectory_index = [self.names.index(n) for n in self.p["trajectory_joint_names"]]
            self.command_pub = self.create_publisher(JointTrajectory, self.p["trajectory_topic"], qos.COMMANDS)
        self.status_pub = self.create_publisher(ControllerStatus, "/m2vla/controller_status", qos.STATUS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos.STATUS)
        # Callbacks run on one executor thread and only hand data over; the command loop below owns timing.
        guard = self._guard
        self.create_subscription(ActionChunk, "/m2vla/action_chunk", guard("chunk", self._on_chunk), qos.CHUNKS)
        self.create_subscription(JointState, "/joint_states", guard("joint_state", self._on_joint_state), qos.SENSOR)
        # an e-stop that cannot be parsed (cannot happen with std_msgs/Bool) still engages it
        self.create_subscription(Bool, "/m2vla/estop", guard("estop", self._on_estop, self._estop_fallback), qos.ESTOP)
        self.create_service(Stop, "~/stop", guard("stop", self._on_stop, failed_service_response))
        self.create_service(Reset, "~/reset", guard("reset", self._on_reset, failed_service_response))
        self.create_timer(1.0 / float(self.p["status_rate_hz"]), guard("status", self._on_status_timer))
        self.create_timer(1.0, guard("diagnostics", self._publish_diagnostics))

        self._stop_loop = threading.Event()
        self._loop_thread = threading.Thread(target=self._loop, name="command-loop", daemon=True)
        self._loop_thread.start()
        self.get_logger().info(f"streaming {len(self.names)} joints at {self.config.command_rate_hz:.0f} Hz to "
                               f"{self.p['command_topic'] if self.p['output'] == 'sim' else self.p['trajectory_topic']}"
                               f" ({self.p['output']})")

    # -- configuration ------------------------------------------------------------------------
    def _build_config(self) -> ControllerConfig:
        p = self.p
        workspace = WorkspaceBox(tuple(p["workspace_lower_m"]), tuple(p["workspace_upper_m"])) \
            if p["workspace_check"] else None
        return ControllerConfig(
            joint_names=tuple(p["joint_names"]),
            limits=JointLimits(tuple(p["position_lower"]), tuple(p["position_upper"]), tuple(p["velocity_limit"]),
                               tuple(p["acceleration_limit"])),
            command_rate_hz=float(p["command_rate_hz"]), interpolation=p["interpolation"],
            blend_s=float(p["blend_s"]), ensemble_chunks=int(p["ensemble_chunks"]),
            ensemble_decay=float(p["ensemble_decay"]), max_chunk_age_s=float(p["max_chunk_age_s"]),
            max_future_stamp_s=float(p["max_future_stamp_s"]), chunk_timeout_s=float(p["chunk_timeout_s"]),
            max_joint_state_age_s=float(p["max_joint_state_age_s"]),
            position_tolerance=float(p["position_tolerance"]),
            max_chunk_speed_factor=float(p["max_chunk_speed_factor"]), workspace=workspace,
            max_following_error=float(p["max_following_error"]),
            following_error_time_s=float(p["following_error_time_s"]),
            following_error_exempt=self._following_error_exempt())

    def _following_error_exempt(self) -> tuple[str, ...]:
        """Joints the following-error check skips: those named (a name that is not a joint here is
        dropped with a warning: there is nothing to skip) and, with ros2_control output, those
        never sent to it (they are not commanded, so they cannot follow)."""
        names = list(self.p["joint_names"])
        asked = [n for n in self.p["following_error_exempt"] if n]  # [""]: ROS parameters have no empty list
        unknown = [n for n in asked if n not in names]
        if unknown:
            self.get_logger().warning(f"following_error_exempt names {unknown}, not in joint_names: ignored")
        unsent = [n for n in names if self.p["output"] == "joint_trajectory"
                  and n not in self.p["trajectory_joint_names"]]
        return tuple(dict.fromkeys([n for n in asked if n in names] + unsent))

    def _forward_kinematics(self):
        if self.config.workspace is None:
            return None
        arm = [f"panda_joint{i}" for i in range(1, 8)]
        if list(self.config.joint_names[:7]) != arm:  # a safety check asked for is never dropped quietly
            raise ValueError(f"workspace_check needs the 7 Panda arm joints {arm} first in joint_names, got "
                             f"{list(self.config.joint_names)}; set workspace_check:=false to run without the box")
        from m2vla_core.kinematics import PandaKinematics

        kinematics = PandaKinematics()
        return lambda q: kinematics.end_effector_positions(np.asarray(q)[None, :7])[0]  # (A,) -> (3,)

    # -- inputs -------------------------------------------------------------------------------
    def _guard(self, what: str, callback, fallback=None):
        """``callback`` that never raises out of the executor (which would end the node)."""
        return guard_callback(what, callback, self._reject_internal, fallback)

    def _reject_internal(self, what: str, reason: str) -> None:
        """An unexpected callback exception: counted by the streamer (one odd message must not stop
        the command stream) and logged."""
        reason = short(reason)
        with self._lock:
            self.streamer.reject(what, reason)
        self.get_logger().error(f"{what} callback failed: {reason}", throttle_duration_sec=1.0)

    def _estop_fallback(self, _msg) -> None:
        with self._lock:
            self.streamer.set_estop(True, time.monotonic())

    def _observation_monotonic(self, stamp_ns: int) -> float:
        """Map a ROS-clock stamp onto the monotonic clock through its age now."""
        age_s = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-9
        return time.monotonic() - age_s

    def _on_chunk(self, msg: ActionChunk) -> None:
        try:
            fields = msg_to_chunk(msg, self.names)
        except ValueError as exc:  # ConversionError and anything else malformed
            with self._lock:
                self.streamer.reject("chunk", str(exc))
            self.get_logger().warning(f"chunk #{msg.sequence_id} refused: {short(exc)}", throttle_duration_sec=1.0)
            return
        chunk = Chunk(fields.values, fields.dt_s, self._observation_monotonic(fields.observation_stamp_ns),
                      fields.sequence_id, fields.instruction_id)
        with self._lock:
            reason = self.streamer.offer_chunk(chunk, time.monotonic())
        if reason is not None:
            self.get_logger().warning(f"chunk #{fields.sequence_id} refused: {reason}", throttle_duration_sec=1.0)

    def _on_joint_state(self, msg: JointState, info: MessageInfo) -> None:
        try:
            positions = joint_state_to_array(msg, self.names)
        except ValueError as exc:  # ConversionError and anything else malformed
            with self._lock:
                self.streamer.reject("joint_state", str(exc))
            self.get_logger().warning(f"joint state refused: {short(exc)}", throttle_duration_sec=1.0)
            return
        with self._lock:
            reason = self.streamer.update_joint_state(positions, arrival_monotonic(info))
        if reason is not None:
            self.get_logger().warning(f"joint state refused: {reason}", throttle_duration_sec=1.0)

    def _on_estop(self, msg: Bool) -> None:
        engaged = bool(msg.data)
        with self._lock:
            changed = engaged != self.streamer.estop
            self.streamer.set_estop(engaged, time.monotonic())
        if changed and engaged:
            self.get_logger().error("E-STOP latched: holding position")
        elif changed:
            self.get_logger().warning("e-stop released: holding until a new chunk")

    def _on_stop(self, request: Stop.Request, response: Stop.Response) -> Stop.Response:
        with self._lock:
            self.streamer.stop(time.monotonic())
        self.get_logger().info(f"stop: {request.reason or 'no reason given'}; holding")
        response.success, response.message = True, "chunk dropped; holding the commanded position"
        return response

    def _on_reset(self, _request: Reset.Request, response: Reset.Response) -> Reset.Response:
        with self._lock:
            self.streamer.set_estop(False, time.monotonic())
            self.streamer.reset(time.monotonic())
        self.get_logger().info("reset: chunks dropped, e-stop cleared, holding the measured state")
        response.success, response.error_code = True, Reset.Request.OK
        response.message = "controller reset; holding the measured joint state"
        return response

    # -- command loop -------------------------------------------------------------------------
    def _enter_realtime(self) -> None:
        """SCHED_FIFO for this (the command) thread only: late wake-ups, not compute, cause jitter."""
        priority = int(self.p["realtime_priority"])
        if priority <= 0:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))  # 0 = the calling thread
            self.get_logger().info(f"command thread runs SCHED_FIFO priority {priority}")
        except (PermissionError, OSError, AttributeError) as exc:
            self.get_logger().warning(f"realtime_priority {priority} refused ({exc}); command thread keeps normal "
                                      "scheduling: grant CAP_SYS_NICE or an rtprio limit for on-time ticks")

    def _loop(self) -> None:
        self._enter_realtime()
        grid = TickGrid(self.config.period_s, time.monotonic())
        last_state = None
        logged_faults = 0  # following-error faults already logged
        while not self._stop_loop.is_set():
            delay = grid.next_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            tick_s = grid.tick(now)  # on the grid, not at the wake-up time (see TickGrid)
            try:
                with self._lock:
                    command = self.streamer.step(tick_s)
                self._send(command)
                if (command.state, command.hold_reason) != last_state:
                    last_state = (command.state, command.hold_reason)
                    faults = self.streamer.stats["following_error_faults"]
                    if command.hold_reason == HOLD_FOLLOWING_ERROR and faults > logged_faults:
                        logged_faults = faults  # once per fault, not after every e-stop in between
                        self.get_logger().error(f"FOLLOWING ERROR: {self.streamer.fault}; holding the measured "
                                                "position until ~/reset")
                    self._update_status(command)
                    self._publish_status()
            except Exception as exc:  # noqa: BLE001 - the loop must survive; the streamer holds next tick
                if not self.context.ok():
                    break  # shutting down (Ctrl-C / SIGTERM): nothing to publish to any more
                self.get_logger().error(f"command tick failed: {exc}", throttle_duration_sec=1.0)
                command = None
            with self._timing_lock:
                self.monitor.tick(now)

    def _send(self, command) -> None:
        if command.position is None:
            return
        # stamped with the tick the command is for (command.time_s, monotonic), not when it left:
        # consecutive commands are a period apart in their stamps however this thread was scheduled
        # (send-time stamps plus a command lost on the way made a subscriber see a double step)
        late_ns = int((time.monotonic() - command.time_s) * 1e9)
        stamp = ns_to_stamp(self.get_clock().now().nanoseconds - late_ns)
        if self.p["output"] == "sim":
            self.command_pub.publish(array_to_joint_state(self.names, command.position, velocities=command.velocity,
                                                          stamp=stamp))
            return
        idx = self._trajectory_index
        lookahead = float(self.p["trajectory_lookahead_s"])
        point = JointTrajectoryPoint(positions=command.position[idx].tolist(),
                                     velocities=command.velocity[idx].tolist(),
                                     time_from_start=Duration(sec=int(lookahead), nanosec=int((lookahead % 1) * 1e9)))
        msg = JointTrajectory(joint_names=list(self.p["trajectory_joint_names"]), points=[point])
        # header.stamp zero = "start now" for joint_trajectory_controller; streaming replaces the point each tick
        self.command_pub.publish(msg)

    # -- status -------------------------------------------------------------------------------
    def _update_status(self, command=None) -> None:
        if command is not None:
            self.status.state = STATE_IDS.get(command.state, ControllerStatus.STATE_HOLDING)
            self.status.hold_reason = command.hold_reason
        with self._lock:
            stats = dict(self.streamer.stats)
        self.status.chunks_accepted = stats.get("chunks_accepted", 0)
        self.status.chunks_rejected = stats.get("chunks_rejected", 0)
        self.status.commands_sent = stats.get("commands", 0)
        self.status.limit_clamps = stats.get("limit_clamps", 0)

    def _publish_status(self) -> None:
        self._update_status()
        self.status.header.stamp = self.get_clock().now().to_msg()
        self.status_pub.publish(self.status)

    def _on_status_timer(self) -> None:
        """Heartbeat: command timing over the last status period, then the status message."""
        with self._timing_lock:
            timing = self.monitor.summary()
        self.status.command_rate_hz = timing["rate_hz"]
        self.status.period_error_p99_ms = timing["period_error_p99_ms"]
        self._on_time_fraction = timing["on_time_fraction"]
        self._publish_status()

    def _publish_diagnostics(self) -> None:
        timing = {"command_rate_hz": self.status.command_rate_hz,
                  "period_error_p99_ms": self.status.period_error_p99_ms,
                  "on_time_fraction": getattr(self, "_on_time_fraction", 0.0)}
        with self._lock:
            values = {**self.streamer.stats, **self.streamer.rejections}
            last = self.streamer.last_rejection
            fault, peak = self.streamer.fault, self.streamer.following_error_peak
            self.streamer.following_error_peak = 0.0  # the next report covers the next period
        state = {v: k for k, v in STATE_IDS.items()}.get(self.status.state, "holding")
        level = DiagnosticStatus.OK
        message = state if not self.status.hold_reason else f"{state}: {self.status.hold_reason}"
        if self.status.state == ControllerStatus.STATE_ESTOP or fault:
            level = DiagnosticStatus.ERROR
        elif self.status.chunks_rejected or any(k.startswith("joint_state:") for k in values):
            level = DiagnosticStatus.WARN
        items = {**{k: str(v) for k, v in values.items()}, **{k: f"{v:.4g}" for k, v in timing.items()},
                 "last_rejection": last, "following_error_fault": fault, "following_error_peak": f"{peak:.4g}"}
        self.diag_pub.publish(diagnostic_array("m2vla_controller", self.p["output"], level, message,
                                               dict(sorted(items.items())), self.get_clock().now().to_msg()))

    def destroy_node(self) -> None:
        self._stop_loop.set()
        if self._loop_thread.is_alive():
            self._loop_thread.join(timeout=2.0)
        super().destroy_node()


GIL_SWITCH_INTERVAL_S = 0.0001  # default 5 ms: the command thread would wait that long for the GIL


def main(args: list[str] | None = None) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Callbacks only convert and hand over under a lock, so one executor thread is enough;
    # the command loop has its own thread and must not wait for the GIL behind them.
    node_process.run("m2vla_controller", ControllerNode, SingleThreadedExecutor, args=args)


if __name__ == "__main__":
    main()
