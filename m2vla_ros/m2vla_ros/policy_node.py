"""Policy node: newest features + newest /joint_states -> MoL + MSM head -> /m2vla/action_chunk.

Runs on a timer at ``control_rate_hz`` and never waits on the VLM: each tick takes whatever
features are newest and refuses to act when they (or the joint state) are older than the
configured ages, or when the e-stop is latched. Loading a head announces its feature contract
on the latched /m2vla/feature_contract topic so perception computes exactly what it reads (and,
for a head that reads the named objects' positions, which object localiser reads them);
``~/load_policy`` swaps heads while running; a refused checkpoint (missing, pickle, truncated,
unknown config keys, other backbone) keeps the running head and is answered with its code.

Bad input never crashes the node or produces a chunk: every refusal is logged (rate-limited),
counted in ``PolicyStatus.inputs_rejected`` and, by kind, in /diagnostics (``features:mismatch``,
``joint_state:non_finite``, ``load_policy:invalid_checkpoint``, ...); every callback is guarded
(an unexpected exception is an ``<input>:internal`` rejection, not a dead node).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Point
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.subscription import MessageInfo
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool
from visualization_msgs.msg import Marker, MarkerArray

from m2vla_core.control.timing import GRAPH_LATENCY_BUDGET_S, chunk_hold_s, rate_without_holds_hz
from m2vla_core.policy_engine import PolicyEngine, PolicyLoadError
from m2vla_msgs.msg import ActionChunk, FeatureContract, LayerFeatures, PolicyStatus
from m2vla_msgs.srv import LoadPolicy, Reset, Stop
from m2vla_ros import node_process, qos
from m2vla_ros.conversions import (
    Rejections, arrival_monotonic, chunk_to_msg, contract_to_msg, diagnostic_array, failed_service_response,
    joint_state_to_array, msg_to_features, short, stamp_to_ns,
)
from m2vla_ros.executor import SingleSubmitMultiThreadedExecutor
from m2vla_ros.params import declare_parameters

PARAMETERS = {
    "checkpoint": ("", "head checkpoint dir; empty = the shipped embedded policy"),
    "backend": ("onnxruntime", "onnxruntime | torch"),
    "device": ("cpu", "cpu | cuda"),
    "control_rate_hz": (2.5, "[Hz] chunks per second (the shipped policy: one per 4 waypoints, ensembled by the "
                             "controller)", (0.1, 200.0)),
    "max_feature_age_s": (0.5, "[s] do not act on older features", (0.01, 60.0)),
    "max_joint_state_age_s": (0.2, "[s] do not act on an older joint state", (0.001, 10.0)),
    "publish_markers": (True, "predicted end-effector path on /m2vla/predicted_path"),
    "status_rate_hz": (2.0, "[Hz] /m2vla/policy_status heartbeat", (0.1, 100.0)),
    "contract_period_s": (1.0, "[s] republish the latched feature contract this often", (0.1, 60.0)),
}
MAX_FUTURE_STAMP_S = 0.05  # [s] features stamped further ahead of this clock are refused (clock skew)
LOAD_CODES = {LoadPolicy.Request.NOT_FOUND: "not_found", LoadPolicy.Request.INVALID_CHECKPOINT: "invalid_checkpoint",
              LoadPolicy.Request.CONTRACT_MISMATCH: "contract_mismatch",
              LoadPolicy.Request.BACKEND_ERROR: "backend_error"}


class PolicyNode(Node):
    def __init__(self) -> None:
        super().__init__("m2vla_policy")
        self.p = declare_parameters(self, PARAMETERS)
        self.engine = PolicyEngine()
        self._lock = threading.Lock()
        # (hidden, mask, LayerFeatures header stamp, instruction_id, received monotonic, named objects' x, y)
        self._features = None
        self._generation = 0  # +1 per head loaded: features read against an older head's contract are dropped
        self._joints = None  # (positions ndarray, monotonic time DDS received it)
        self._estop = False
        self._stopped_instruction = -1  # instruction id stopped via ~/stop; a newer one resumes
        self._sequence_id = 0
        self._perception_digest = ""  # backbone weights digest seen on /m2vla/features
        self.status = PolicyStatus(state=PolicyStatus.STATE_ERROR, message="no policy loaded")
        self.rejections = Rejections(self.get_logger())
        self._usable = False  # a head is loaded and the node can name its state and action joints

        self.chunk_pub = self.create_publisher(ActionChunk, "/m2vla/action_chunk", qos.CHUNKS)
        self.status_pub = self.create_publisher(PolicyStatus, "/m2vla/policy_status", qos.STATUS)
        self.contract_pub = self.create_publisher(FeatureContract, "/m2vla/feature_contract", qos.LATCHED)
        self.marker_pub = self.create_publisher(MarkerArray, "/m2vla/predicted_path", qos.STATUS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos.STATUS)
        guard = self.rejections.guard
        # Features get their own callback group: behind the 100 Hz joint states and the timers in
        # the default group, a new instruction's features waited up to ~1 s in the graph
        # (docs/performance.md, section 4). The tick lock serializes the ticks.
        self.create_subscription(LayerFeatures, "/m2vla/features", guard("features", self._on_features), qos.FEATURES,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        self.create_subscription(JointState, "/joint_states", guard("joint_state", self._on_joint_state), qos.SENSOR)
        self.create_subscription(Bool, "/m2vla/estop", guard("estop", self._on_estop), qos.ESTOP,
                                 callback_group=MutuallyExclusiveCallbackGroup())  # never behind an inference
        control_group = MutuallyExclusiveCallbackGroup()  # the tick never waits behind a service call
        self.create_timer(1.0 / float(self.p["control_rate_hz"]), guard("tick", self._tick),
                          callback_group=control_group)
        # The first features of a new instruction are acted on at once, in the features callback,
        # not at the next timer phase (up to one control period later). _tick_lock keeps that tick
        # and the timer's from running at the same time.
        self._tick_lock = threading.Lock()
        self._tick_now = guard("tick", self._tick)
        # A tick that found everything ready but the joint state (missing or older than
        # max_joint_state_age_s, e.g. the process was starved for a moment) is retried on the
        # next joint state, not a control period later: a new instruction never waits a timer phase.
        # (One stored while that tick ran is not retried; the one after it is.)
        self._retry_on_joint_state = False
        self.create_timer(1.0 / float(self.p["status_rate_hz"]), guard("status", self._publish_status))
        self.create_timer(1.0, guard("diagnostics", self._publish_diagnostics))
        # The contract is latched, but Fast DDS sometimes does not deliver a transient-local sample
        # to a late-joining reader (eProsima/Fast-DDS#3822; seen here: a perception that never got
        # it and never computed a feature). Republished every contract_period_s; perception
        # ignores an unchanged one.
        self.create_timer(float(self.p["contract_period_s"]), guard("contract", self._publish_contract))
        self.create_service(LoadPolicy, "~/load_policy",
                            guard("load_policy", self._on_load_policy, failed_service_response))
        self.create_service(Reset, "~/reset", guard("reset", self._on_reset, failed_service_response))
        self.create_service(Stop, "~/stop", guard("stop", self._on_stop, failed_service_response))
        self._load(self.p["checkpoint"], self.p["backend"])

    # -- loading ------------------------------------------------------------------------------
    def _load(self, checkpoint: str, backend: str) -> tuple[bool, int, str]:
        with self._tick_lock:  # no tick runs the engine while it is swapped
            return self._load_locked(checkpoint, backend)

    def _load_locked(self, checkpoint: str, backend: str) -> tuple[bool, int, str]:
        previous = (self.engine.checkpoint, self.engine.backend) if self.engine.loaded and self._usable else None
        try:
            self.engine.load(checkpoint, backend=backend or "onnxruntime", device=self.p["device"],
                             expected_backbone_digest=self._perception_digest)
        except Exception as exc:  # noqa: BLE001 - PolicyLoadError, or anything a damaged checkpoint raises
            code = exc.code if isinstance(exc, PolicyLoadError) else LoadPolicy.Request.BACKEND_ERROR
            return self._refuse_load(checkpoint, code, exc if isinstance(exc, PolicyLoadError)
                                     else f"{type(exc).__name__}: {exc}")
        self._forget_inputs()  # the engine swapped (and may be swapped back below)
        try:  # a head whose joints the node cannot name must not stay in
            self.engine.state_joint_names, self.engine.action_names  # noqa: B018
        except Exception as exc:  # noqa: BLE001
            self._usable = False
            if previous is not None:
                try:
                    self.engine.load(previous[0], backend=previous[1], device=self.p["device"])
                    self._usable = True
                except Exception as again:  # noqa: BLE001
                    self.get_logger().error(f"could not restore the previous policy {previous[0]}: {again}")
            return self._refuse_load(checkpoint, LoadPolicy.Request.INVALID_CHECKPOINT,
                                     f"the node cannot name the head's joints: {exc}")
        self._usable = True
        self.status.checkpoint, self.status.backend = self.engine.checkpoint, self.engine.backend
        self._publish_contract()
        self._set_state(PolicyStatus.STATE_IDLE, "policy loaded; waiting for an instruction")
        self.get_logger().info(f"policy loaded: {self.engine.checkpoint} ({self.engine.backend})")
        self._warn_if_chunks_run_out()
        return True, LoadPolicy.Request.OK, f"loaded {self.engine.checkpoint} with {self.engine.backend}"

    def _warn_if_chunks_run_out(self) -> None:
        """A head whose chunks are shorter than the policy period (plus the graph's latency) makes
        the arm stop at the end of every chunk: say so, with the rate that would avoid it."""
        span_s = self.engine.config.chunk_len * self.engine.action_dt_s
        period_s = 1.0 / float(self.p["control_rate_hz"])
        hold_s = chunk_hold_s(span_s, period_s)
        if hold_s > 0.0:
            rate_hz = rate_without_holds_hz(span_s)
            needed = "no rate can avoid it" if rate_hz is None else f"control_rate_hz above {rate_hz:.3g} Hz would avoid it"
            self.get_logger().warning(
                f"each chunk covers {span_s:.2f} s, but the next arrives about {period_s + GRAPH_LATENCY_BUDGET_S:.2f} s "
                f"after its observation (control_rate_hz {self.p['control_rate_hz']} + {GRAPH_LATENCY_BUDGET_S} s "
                f"latency): the arm holds {hold_s:.2f} s at the end of every chunk; {needed}")

    def _forget_inputs(self) -> None:
        """Features of the old contract and joints in the old head's order are not valid any more."""
        with self._lock:
            self._features, self._joints = None, None
            self._generation += 1

    def _publish_contract(self) -> None:
        if self.engine.loaded and self._usable:
            self.contract_pub.publish(contract_to_msg(self.engine, self.get_clock().now().to_msg()))

    def _refuse_load(self, checkpoint: str, code: int, reason: object) -> tuple[bool, int, str]:
        message = short(reason, 1000)
        self.rejections.reject("load_policy", f"{LOAD_CODES.get(code, 'error')}: "
                                              f"{short(checkpoint, 200) or '<embedded>'}: {message}")
        if not (self.engine.loaded and self._usable):
            self._set_state(PolicyStatus.STATE_ERROR, message)
        return False, code, message

    def _on_load_policy(self, request: LoadPolicy.Request, response: LoadPolicy.Response) -> LoadPolicy.Response:
        response.success, response.error_code, response.message = self._load(request.checkpoint, request.backend)
        return response

    # -- inputs -------------------------------------------------------------------------------
    def _on_features(self, msg: LayerFeatures) -> None:
        if not self.engine.loaded:
            self.rejections.reject("features", "no_policy: no head is loaded to read them")
            return
        with self._lock:
            generation = self._generation
        try:
            hidden, mask = msg_to_features(msg, self.engine.contract)
        except (ValueError, AttributeError) as exc:
            self.rejections.reject("features", exc)
            return
        if self.engine.backbone_digest and msg.backbone_digest and msg.backbone_digest != self.engine.backbone_digest:
            self.rejections.reject("features", "mismatch: computed by another backbone than the head was trained on")
            return
        if msg.header.stamp.sec < 0:  # no camera takes frames before 1970; rclpy's Time refuses it at every tick
            self.rejections.reject("features", f"bad_stamp: camera stamp {msg.header.stamp.sec} s is negative")
            return
        ahead_s = (stamp_to_ns(msg.header.stamp) - self.get_clock().now().nanoseconds) * 1e-9
        if ahead_s > MAX_FUTURE_STAMP_S:
            self.rejections.reject("features", f"future_stamp: camera stamp is {ahead_s:.3f} s in the future "
                                               f"(clock skew?)")
            return
        with self._lock:
            if generation != self._generation:
                return  # a head was loaded while these were read against the old one's contract
            new_instruction = self._features is None or self._features[3] != int(msg.instruction_id)
            self._perception_digest = str(msg.backbone_digest)
            self._features = (hidden, mask, msg.header.stamp, int(msg.instruction_id), time.monotonic(),
                              np.asarray(msg.named_objects_xy, dtype=np.float32))
        if new_instruction:
            self._tick_now()

    def _on_joint_state(self, msg: JointState, info: MessageInfo) -> None:
        if not (self.engine.loaded and self._usable):
            return
        with self._lock:
            generation = self._generation
        try:
            positions = joint_state_to_array(msg, self.engine.state_joint_names)
        except ValueError as exc:
            self.rejections.reject("joint_state", exc)
            return
        with self._lock:
            if generation != self._generation:
                return  # ordered for the head that was just replaced
            self._joints = (positions, arrival_monotonic(info))
        if self._retry_on_joint_state:
            self._tick_now()

    def _on_estop(self, msg: Bool) -> None:
        released = self._estop and not msg.data
        self._estop = bool(msg.data)
        if self._estop:
            self._set_state(PolicyStatus.STATE_WAITING, "e-stop latched")
        elif released:
            self._set_state(PolicyStatus.STATE_WAITING, "e-stop released")

    def _on_reset(self, _request: Reset.Request, response: Reset.Response) -> Reset.Response:
        with self._tick_lock:  # a tick in progress publishes before the reset, none runs during it
            with self._lock:
                self._features, self._joints = None, None
            self.engine.reset()
        self._set_state(PolicyStatus.STATE_IDLE, "reset")
        response.success, response.error_code, response.message = True, Reset.Request.OK, "policy state cleared"
        return response

    def _on_stop(self, request: Stop.Request, response: Stop.Response) -> Stop.Response:
        with self._lock:
            self._stopped_instruction = self._features[3] if self._features else self._stopped_instruction
        self._set_state(PolicyStatus.STATE_IDLE, f"stopped: {request.reason or 'no reason given'}")
        response.success, response.message = True, "no chunks until a new instruction"
        return response

    # -- control tick -------------------------------------------------------------------------
    def _tick(self) -> None:
        with self._tick_lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        self._retry_on_joint_state = False
        if not (self.engine.loaded and self._usable):
            return
        with self._lock:
            features, joints = self._features, self._joints
        now = time.monotonic()
        if self._estop:
            return self._set_state(PolicyStatus.STATE_WAITING, "e-stop latched")
        if features is None:
            return self._set_state(PolicyStatus.STATE_WAITING if self.status.state != PolicyStatus.STATE_IDLE
                                   else PolicyStatus.STATE_IDLE, "no features yet")
        hidden, mask, obs_stamp, instruction_id, received, named_objects_xy = features
        if instruction_id <= self._stopped_instruction:
            return
        age_s = self._age_s(obs_stamp, received, now)
        self.status.feature_age_s = float(age_s)
        if age_s > float(self.p["max_feature_age_s"]):
            return self._set_state(PolicyStatus.STATE_WAITING, f"features are {age_s:.2f} s old")
        if joints is None or now - joints[1] > float(self.p["max_joint_state_age_s"]):
            self._retry_on_joint_state = True
            return self._set_state(PolicyStatus.STATE_WAITING, "joint state missing or stale")
        try:
            t0 = time.perf_counter()
            chunk = self.engine.infer(hidden, mask, joints[0], instruction_id, named_objects_xy)  # (H, A) or None
            self.status.inference_ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # noqa: BLE001 - a bad step is refused, never a crash
            self.rejections.reject("inference", f"error: {type(exc).__name__}: {exc}")
            return self._set_state(PolicyStatus.STATE_REFUSED, short(f"inference failed: {exc}"))
        if chunk is None:
            return self._set_state(PolicyStatus.STATE_REFUSED, self.engine.refusal_reason)
        try:
            msg = chunk_to_msg(chunk, self.engine, stamp=self.get_clock().now().to_msg(),
                               observation_stamp=obs_stamp, sequence_id=self._sequence_id + 1,
                               instruction_id=instruction_id)
        except ValueError as exc:  # e.g. a head whose action names do not fit its chunk: refuse, never publish
            self.rejections.reject("chunk", exc)
            return self._set_state(PolicyStatus.STATE_REFUSED, short(f"chunk refused: {exc}"))
        if self._estop or instruction_id <= self._stopped_instruction:
            return  # e-stop or ~/stop arrived while this tick ran: its chunk is dropped, their status kept
        self._sequence_id += 1
        self.chunk_pub.publish(msg)
        self.status.chunks_published += 1
        self.status.last_sequence_id = self._sequence_id
        self.status.instruction_id = instruction_id
        self.status.routed_pack, self.status.route_confidence = self.engine.routed_pack, self.engine.route_confidence
        self._set_state(PolicyStatus.STATE_RUNNING, "publishing chunks")
        if self.p["publish_markers"]:
            self._publish_path(chunk)

    def _age_s(self, stamp, received_monotonic: float, now_monotonic: float) -> float:
        """Age of the observation: by its stamp on the ROS clock, never less than since receipt."""
        stamp_age = (self.get_clock().now().nanoseconds - stamp_to_ns(stamp)) * 1e-9
        return max(stamp_age, now_monotonic - received_monotonic)

    def _publish_path(self, chunk: np.ndarray) -> None:
        points = self.engine.end_effector_path(chunk)  # (H, 3) in the base frame, or None
        if points is None:
            return
        marker = Marker(ns="m2vla_predicted_path", id=0, type=Marker.LINE_STRIP, action=Marker.ADD)
        marker.header.frame_id = self.engine.base_frame
        marker.header.stamp = self.get_clock().now().to_msg()
        marker.scale.x = 0.008
        marker.color.r, marker.color.g, marker.color.b, marker.color.a = 0.1, 0.9, 0.3, 1.0
        marker.pose.orientation.w = 1.0
        marker.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in points]
        self.marker_pub.publish(MarkerArray(markers=[marker]))

    def _set_state(self, state: int, message: str) -> None:
        changed = state != self.status.state or message != self.status.message
        self.status.state, self.status.message = state, message
        if changed:
            self._publish_status()

    def _publish_status(self) -> None:
        self.status.inputs_rejected = self.rejections.total
        self.status.header.stamp = self.get_clock().now().to_msg()
        self.status_pub.publish(self.status)

    def _publish_diagnostics(self) -> None:
        rejections = self.rejections.snapshot()
        level = DiagnosticStatus.OK
        if self.status.state == PolicyStatus.STATE_ERROR:
            level = DiagnosticStatus.ERROR
        elif rejections or self.status.state == PolicyStatus.STATE_REFUSED:
            level = DiagnosticStatus.WARN
        items = {"state": self.status.state, "checkpoint": self.status.checkpoint,
                 "chunks_published": self.status.chunks_published, "last_sequence_id": self.status.last_sequence_id,
                 "feature_age_s": f"{self.status.feature_age_s:.3f}", "inference_ms": f"{self.status.inference_ms:.3f}",
                 "rejected_total": sum(rejections.values()), "last_rejection": self.rejections.last, **rejections}
        self.diag_pub.publish(diagnostic_array("m2vla_policy", self.status.backend or "", level, self.status.message,
                                               items, self.get_clock().now().to_msg()))


def main(args: list[str] | None = None) -> None:
    # threads: control tick, features, the rest (the e-stop has its own group)
    node_process.run("m2vla_policy", PolicyNode, lambda: SingleSubmitMultiThreadedExecutor(num_threads=3),
                     args=args)


if __name__ == "__main__":
    main()
