"""Policy node: newest features + newest /joint_states -> MoL + MSM head -> /m2vla/action_chunk.

Runs on a timer at ``control_rate_hz`` and never waits on the VLM: each tick takes whatever
features are newest and refuses to act when they (or the joint state) are older than the
configured ages, or when the e-stop is latched. Loading a head announces its feature contract
on the latched /m2vla/feature_contract topic so perception computes exactly what it reads;
``~/load_policy`` swaps heads while running.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import rclpy
from geometry_msgs.msg import Point
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.time import Time
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool
from visualization_msgs.msg import Marker, MarkerArray

from m2vla_core.policy_engine import PolicyEngine, PolicyLoadError
from m2vla_msgs.msg import ActionChunk, FeatureContract, LayerFeatures, PolicyStatus
from m2vla_msgs.srv import LoadPolicy, Reset, Stop
from m2vla_ros import qos
from m2vla_ros.conversions import chunk_to_msg, contract_to_msg, joint_state_to_array, msg_to_features
from m2vla_ros.params import declare_parameters

PARAMETERS = {
    "checkpoint": ("", "head checkpoint dir; empty = the shipped embedded policy"),
    "backend": ("onnxruntime", "onnxruntime | torch"),
    "device": ("cpu", "cpu | cuda"),
    "control_rate_hz": (10.0, "[Hz] head steps per second", (0.1, 200.0)),
    "max_feature_age_s": (0.5, "[s] do not act on older features", (0.01, 60.0)),
    "max_joint_state_age_s": (0.2, "[s] do not act on an older joint state", (0.001, 10.0)),
    "publish_markers": (True, "predicted end-effector path on /m2vla/predicted_path"),
    "status_rate_hz": (2.0, "[Hz] /m2vla/policy_status heartbeat", (0.1, 100.0)),
}


class PolicyNode(Node):
    def __init__(self) -> None:
        super().__init__("m2vla_policy")
        self.p = declare_parameters(self, PARAMETERS)
        self.engine = PolicyEngine()
        self._lock = threading.Lock()
        self._features = None  # (hidden, mask, LayerFeatures header stamp, instruction_id, received monotonic)
        self._joints = None  # (positions ndarray, received monotonic)
        self._estop = False
        self._stopped_instruction = -1  # instruction id stopped via ~/stop; a newer one resumes
        self._sequence_id = 0
        self._perception_digest = ""  # backbone weights digest seen on /m2vla/features
        self.status = PolicyStatus(state=PolicyStatus.STATE_ERROR, message="no policy loaded")

        self.chunk_pub = self.create_publisher(ActionChunk, "/m2vla/action_chunk", qos.CHUNKS)
        self.status_pub = self.create_publisher(PolicyStatus, "/m2vla/policy_status", qos.STATUS)
        self.contract_pub = self.create_publisher(FeatureContract, "/m2vla/feature_contract", qos.LATCHED)
        self.marker_pub = self.create_publisher(MarkerArray, "/m2vla/predicted_path", qos.STATUS)
        self.create_subscription(LayerFeatures, "/m2vla/features", self._on_features, qos.FEATURES)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, qos.SENSOR)
        self.create_subscription(Bool, "/m2vla/estop", self._on_estop, qos.ESTOP)
        control_group = MutuallyExclusiveCallbackGroup()  # the tick never waits behind a service call
        self.create_timer(1.0 / float(self.p["control_rate_hz"]), self._tick, callback_group=control_group)
        self.create_timer(1.0 / float(self.p["status_rate_hz"]), self._publish_status)
        self.create_service(LoadPolicy, "~/load_policy", self._on_load_policy)
        self.create_service(Reset, "~/reset", self._on_reset)
        self.create_service(Stop, "~/stop", self._on_stop)
        self._load(self.p["checkpoint"], self.p["backend"])

    # -- loading ------------------------------------------------------------------------------
    def _load(self, checkpoint: str, backend: str) -> tuple[bool, int, str]:
        try:
            self.engine.load(checkpoint, backend=backend or "onnxruntime", device=self.p["device"],
                             expected_backbone_digest=self._perception_digest)
        except PolicyLoadError as exc:
            self.get_logger().error(f"policy {checkpoint or '<embedded>'} refused: {exc}")
            if not self.engine.loaded:
                self._set_state(PolicyStatus.STATE_ERROR, str(exc))
            return False, exc.code, str(exc)
        with self._lock:
            self._features = None  # features of the old contract are not valid for the new head
        self.status.checkpoint, self.status.backend = self.engine.checkpoint, self.engine.backend
        self.contract_pub.publish(contract_to_msg(self.engine, self.get_clock().now().to_msg()))
        self._set_state(PolicyStatus.STATE_IDLE, "policy loaded; waiting for an instruction")
        self.get_logger().info(f"policy loaded: {self.engine.checkpoint} ({self.engine.backend})")
        return True, LoadPolicy.Request.OK, f"loaded {self.engine.checkpoint} with {self.engine.backend}"

    def _on_load_policy(self, request: LoadPolicy.Request, response: LoadPolicy.Response) -> LoadPolicy.Response:
        response.success, response.error_code, response.message = self._load(request.checkpoint, request.backend)
        return response

    # -- inputs -------------------------------------------------------------------------------
    def _on_features(self, msg: LayerFeatures) -> None:
        try:
            hidden, mask = msg_to_features(msg, self.engine.contract)
        except (ValueError, AttributeError) as exc:
            self.status.inputs_rejected += 1
            self.get_logger().warning(f"features refused: {exc}", throttle_duration_sec=2.0)
            return
        if self.engine.backbone_digest and msg.backbone_digest and msg.backbone_digest != self.engine.backbone_digest:
            self.status.inputs_rejected += 1
            self.get_logger().warning("features refused: computed by another backbone than the head was trained on",
                                      throttle_duration_sec=2.0)
            return
        with self._lock:
            self._perception_digest = str(msg.backbone_digest)
            self._features = (hidden, mask, msg.header.stamp, int(msg.instruction_id), time.monotonic())

    def _on_joint_state(self, msg: JointState) -> None:
        if not self.engine.loaded:
            return
        try:
            positions = joint_state_to_array(msg, self.engine.state_joint_names)
        except ValueError as exc:
            self.status.inputs_rejected += 1
            self.get_logger().warning(f"joint state refused: {exc}", throttle_duration_sec=2.0)
            return
        with self._lock:
            self._joints = (positions, time.monotonic())

    def _on_estop(self, msg: Bool) -> None:
        self._estop = bool(msg.data)
        if self._estop:
            self._set_state(PolicyStatus.STATE_WAITING, "e-stop latched")

    def _on_reset(self, _request: Reset.Request, response: Reset.Response) -> Reset.Response:
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
        if not self.engine.loaded:
            return
        with self._lock:
            features, joints = self._features, self._joints
        now = time.monotonic()
        if self._estop:
            return self._set_state(PolicyStatus.STATE_WAITING, "e-stop latched")
        if features is None:
            return self._set_state(PolicyStatus.STATE_WAITING if self.status.state != PolicyStatus.STATE_IDLE
                                   else PolicyStatus.STATE_IDLE, "no features yet")
        hidden, mask, obs_stamp, instruction_id, received = features
        if instruction_id <= self._stopped_instruction:
            return
        age_s = self._age_s(obs_stamp, received, now)
        self.status.feature_age_s = float(age_s)
        if age_s > float(self.p["max_feature_age_s"]):
            return self._set_state(PolicyStatus.STATE_WAITING, f"features are {age_s:.2f} s old")
        if joints is None or now - joints[1] > float(self.p["max_joint_state_age_s"]):
            return self._set_state(PolicyStatus.STATE_WAITING, "joint state missing or stale")
        try:
            t0 = time.perf_counter()
            chunk = self.engine.infer(hidden, mask, joints[0], instruction_id)  # (H, A) or None
            self.status.inference_ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # noqa: BLE001 - a bad step is refused, never a crash
            self.status.inputs_rejected += 1
            self.get_logger().error(f"inference failed: {exc}", throttle_duration_sec=2.0)
            return self._set_state(PolicyStatus.STATE_REFUSED, f"inference failed: {exc}")
        if chunk is None:
            return self._set_state(PolicyStatus.STATE_REFUSED, self.engine.refusal_reason)
        self._sequence_id += 1
        self.chunk_pub.publish(chunk_to_msg(chunk, self.engine, stamp=self.get_clock().now().to_msg(),
                                            observation_stamp=obs_stamp, sequence_id=self._sequence_id,
                                            instruction_id=instruction_id))
        self.status.chunks_published += 1
        self.status.last_sequence_id = self._sequence_id
        self.status.instruction_id = instruction_id
        self.status.routed_pack, self.status.route_confidence = self.engine.routed_pack, self.engine.route_confidence
        self._set_state(PolicyStatus.STATE_RUNNING, "publishing chunks")
        if self.p["publish_markers"]:
            self._publish_path(chunk)

    def _age_s(self, stamp, received_monotonic: float, now_monotonic: float) -> float:
        """Age of the observation: by its stamp on the ROS clock, never less than since receipt."""
        stamp_age = (self.get_clock().now() - Time.from_msg(stamp)).nanoseconds * 1e-9
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
        self.status.header.stamp = self.get_clock().now().to_msg()
        self.status_pub.publish(self.status)


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = None
    try:
        node = PolicyNode()
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        if rclpy.ok():  # rclpy raises RuntimeError from a wait set torn down by a signal: not an error
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
