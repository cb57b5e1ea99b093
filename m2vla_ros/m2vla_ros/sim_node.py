"""Sim node: the PyBullet task scene (``m2vla_core.sim.TaskEnv``) as a stand-in arm driver.

In: /m2vla/joint_command (sensor_msgs/JointState by name: 7 Panda joints [rad] +
``gripper_opening`` [m], or the two finger joints). Out: /joint_states (the 9 simulator
joints), /camera/image_raw (rgb8) + /camera/camera_info, /m2vla/ee_pose
(geometry_msgs/PoseStamped), /m2vla/scene_markers (cubes and the grasp point as
visualization_msgs markers: there is no tf2 in the PyPI wheels, so frames travel as
messages; robot_state_publisher computes TF from /joint_states where ROS 2 is installed),
/m2vla/task_status. Service ~/reset (task, seed) returns the episode instruction.

Physics runs in real time: a timer advances the world by the wall time elapsed since the last
tick (whole physics steps, debt carried over, capped so a stall never fast-forwards more
than ``MAX_CATCH_UP_S``). All callbacks run on one thread: PyBullet is not thread-safe. Without
commands the arm holds its last target (after a reset: the home pose). Commands further than
``max_command_jump_rad`` from the measured arm are ignored, like a real driver's
discontinuity guard (e.g. a controller still holding the pose of the previous episode).
Refused commands and resets are logged (rate-limited) and counted by kind in /diagnostics
(1 Hz); every callback is guarded, so no message can stop the simulated arm driver.
"""

from __future__ import annotations

import math
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import String
from visualization_msgs.msg import Marker, MarkerArray

from m2vla_core.sim import SimConfig, TaskEnv, get_task, task_names
from m2vla_core.sim.scene import COLOURS_RGBA, CUBE_SIZE_M, CameraConfig
from m2vla_msgs.msg import TaskStatus
from m2vla_msgs.srv import Reset
from m2vla_ros import node_process, qos
from m2vla_ros.conversions import (Rejections, array_to_image, array_to_joint_state, diagnostic_array,
                                   failed_service_response, joint_state_to_array, short)
from m2vla_ros.params import declare_parameters

MAX_CATCH_UP_S = 0.25

PARAMETERS = {
    "task": ("reach_above", "initial task name"),
    "seed": (10000, "initial episode seed", (0, 2**62)),
    "physics_rate_hz": (100.0, "[Hz] real-time physics ticks", (10.0, 1000.0)),
    "joint_state_rate_hz": (100.0, "[Hz] /joint_states (on physics ticks, at most this often)", (1.0, 1000.0)),
    "camera_rate_hz": (10.0, "[Hz] camera image + info; 0 = no camera", (0.0, 60.0)),
    "image_width": (224, "[px] camera width", (8, 2048)),
    "image_height": (224, "[px] camera height", (8, 2048)),
    "renderer": ("tiny", "tiny | egl | auto"),
    "frames_rate_hz": (10.0, "[Hz] /m2vla/ee_pose and /m2vla/scene_markers", (0.1, 100.0)),
    "status_rate_hz": (2.0, "[Hz] /m2vla/task_status heartbeat", (0.1, 100.0)),
    "publish_instruction": (False, "on reset, publish the instruction on /m2vla/instruction"),
    "base_frame": ("panda_link0", "frame of poses and markers (the robot base is the world origin)"),
    "camera_frame": ("camera_optical_frame", "frame_id of the camera topics"),
    "max_command_jump_rad": (0.5, "[rad] ignore commands this far from the measured arm", (0.01, 10.0)),
}


class SimNode(Node):
    def __init__(self) -> None:
        super().__init__("m2vla_sim")
        self.p = declare_parameters(self, PARAMETERS)
        render = float(self.p["camera_rate_hz"]) > 0
        self.env = TaskEnv(SimConfig(image_width=int(self.p["image_width"]), image_height=int(self.p["image_height"]),
                                     render=render, renderer=self.p["renderer"]))
        self.state_names = list(self.env.state_names)  # 7 arm joints + gripper_opening
        self.counters = {"commands": 0, "commands_rejected": 0, "commands_ignored_jump": 0, "resets": 0,
                         "joint_states_published": 0}
        self.rejections = Rejections(self.get_logger())
        self._command: np.ndarray | None = None
        self._episode = 0
        self._seed = int(self.p["seed"])
        self._task = self._initial_task(self.p["task"])
        self._last_success: bool | None = None

        self.joint_pub = self.create_publisher(JointState, "/joint_states", qos.SENSOR_PUB)
        self.image_pub = self.create_publisher(Image, "/camera/image_raw", qos.SENSOR_PUB)
        self.info_pub = self.create_publisher(CameraInfo, "/camera/camera_info", qos.SENSOR_PUB)
        self.pose_pub = self.create_publisher(PoseStamped, "/m2vla/ee_pose", qos.STATUS)
        self.marker_pub = self.create_publisher(MarkerArray, "/m2vla/scene_markers", qos.STATUS)
        self.task_pub = self.create_publisher(TaskStatus, "/m2vla/task_status", qos.STATUS)
        self.instruction_pub = self.create_publisher(String, "/m2vla/instruction", qos.INSTRUCTION)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos.STATUS)
        guard = self.rejections.guard
        self.create_subscription(JointState, "/m2vla/joint_command", guard("command", self._on_command), qos.COMMANDS)
        self.create_service(Reset, "~/reset", guard("reset", self._on_reset, failed_service_response))

        self._reset_episode(self._task, self._seed)
        self._last_joint_pub = 0.0
        self.create_timer(1.0 / float(self.p["physics_rate_hz"]), guard("physics", self._on_physics))
        if render:
            self.create_timer(1.0 / float(self.p["camera_rate_hz"]), guard("camera", self._on_camera))
        self.create_timer(1.0 / float(self.p["frames_rate_hz"]), guard("frames", self._publish_frames))
        self.create_timer(1.0 / float(self.p["status_rate_hz"]), guard("task_status", self._publish_task_status))
        self.create_timer(1.0, guard("diagnostics", self._publish_diagnostics))
        self.get_logger().info(f"sim ready: task {self._task!r} seed {self._seed}, renderer {self.env.renderer}")

    def _initial_task(self, name: str) -> str:
        try:
            return get_task(name).name
        except KeyError as exc:
            fallback = task_names()[0]
            self.get_logger().error(f"{exc.args[0]}; starting with {fallback!r} until ~/reset names a task")
            return fallback

    # -- episode ------------------------------------------------------------------------------
    def _reset_episode(self, task: str, seed: int) -> str:
        obs = self.env.reset(task, seed)
        self._task, self._seed = task, seed
        self._episode += 1
        self._command = None  # commands from before the reset are never replayed
        self._wall_start = time.monotonic()
        self._sim_start = self.env.time_s
        self._last_success = None
        self.counters["resets"] += 1
        self._publish_joint_state()
        self._publish_task_status()
        if self.p["publish_instruction"]:
            self.instruction_pub.publish(String(data=obs.instruction))
        return obs.instruction

    def _on_reset(self, request: Reset.Request, response: Reset.Response) -> Reset.Response:
        task = request.task.strip() or self._task
        seed = int(request.seed) if request.seed >= 0 else self._seed + 1
        try:
            if len(task) > 200:
                raise KeyError(f"unknown task {short(task, 40)!r}: task names are short")
            task = get_task(task).name
        except KeyError as exc:
            response.success, response.error_code = False, Reset.Request.UNKNOWN_TASK
            response.message = short(exc.args[0] if exc.args else exc)
            self.rejections.reject("reset", f"unknown_task: {response.message}")
            return response
        try:
            response.instruction = self._reset_episode(task, seed)
        except Exception as exc:  # noqa: BLE001 - a failed reset is reported, the node stays up
            response.success, response.error_code = False, Reset.Request.FAILED
            response.message = f"reset to {task} seed {seed} failed: {exc}"
            self.get_logger().error(response.message)
            return response
        response.success, response.error_code = True, Reset.Request.OK
        response.message = f"episode {self._episode}: {task} seed {seed}"
        self.get_logger().info(f"reset: {response.message}: {response.instruction!r}")
        return response

    # -- commands -----------------------------------------------------------------------------
    def _on_command(self, msg: JointState) -> None:
        try:
            q = joint_state_to_array(msg, self.state_names)  # (8,) by name; finger joints -> opening
        except ValueError as exc:  # ConversionError and anything else malformed
            self.counters["commands_rejected"] += 1
            self.rejections.reject("command", exc)
            return
        measured = self.env.scene.arm_state()  # (8,)
        jump = float(np.max(np.abs(q[:7] - measured[:7])))
        if jump > float(self.p["max_command_jump_rad"]):
            self.counters["commands_ignored_jump"] += 1
            self.rejections.reject("command", f"jump: {jump:.2f} rad from the measured arm (max "
                                              f"{self.p['max_command_jump_rad']})")
            return
        self._command = q
        self.counters["commands"] += 1

    # -- physics and outputs ------------------------------------------------------------------
    def _on_physics(self) -> None:
        if self._command is not None:
            try:
                self.env.apply_joint_command(self._command)
            except ValueError as exc:
                self.get_logger().warning(f"command not applied: {exc}", throttle_duration_sec=1.0)
            self._command = None  # the target holds until the next command
        hz = self.env.config.physics_hz
        debt_s = (time.monotonic() - self._wall_start) - (self.env.time_s - self._sim_start)
        if debt_s > MAX_CATCH_UP_S:  # stalled (e.g. a slow render): do not fast-forward the world
            self._sim_start += debt_s - MAX_CATCH_UP_S
            debt_s = MAX_CATCH_UP_S
        steps = int(debt_s * hz)
        if steps > 0:
            self.env.step_physics(steps / hz)
        now = time.monotonic()
        if now - self._last_joint_pub >= 0.95 / float(self.p["joint_state_rate_hz"]):
            self._last_joint_pub = now
            self._publish_joint_state()
        success = self.env.success()
        if success != self._last_success:
            self._last_success = success
            self._publish_task_status()

    def _publish_joint_state(self) -> None:
        positions, velocities = self.env.joint_state()  # (9,), (9,)
        self.joint_pub.publish(array_to_joint_state(self.env.joint_names, positions, velocities=velocities,
                                                    stamp=self.get_clock().now().to_msg()))
        self.counters["joint_states_published"] += 1

    def _on_camera(self) -> None:
        rgb = self.env.scene.render()  # (H, W, 3) uint8
        stamp = self.get_clock().now().to_msg()
        self.image_pub.publish(array_to_image(rgb, "rgb8", stamp=stamp, frame_id=self.p["camera_frame"]))
        self.info_pub.publish(self._camera_info(stamp))

    def _camera_info(self, stamp) -> CameraInfo:
        w, h = int(self.p["image_width"]), int(self.p["image_height"])
        fov = CameraConfig().fov_deg if self.env.config.camera is None else self.env.config.camera.fov_deg
        fy = (h / 2.0) / math.tan(math.radians(fov) / 2.0)  # PyBullet's FOV is vertical; square pixels
        fx, cx, cy = fy, w / 2.0, h / 2.0
        info = CameraInfo(width=w, height=h, distortion_model="plumb_bob", d=[0.0] * 5,
                          k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0],
                          r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                          p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0])
        info.header.stamp = stamp
        info.header.frame_id = self.p["camera_frame"]
        return info

    def _publish_frames(self) -> None:
        stamp = self.get_clock().now().to_msg()
        frame = self.p["base_frame"]
        ee = self.env.scene.ee_pose()  # (7,) position [m] + quaternion (x, y, z, w)
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, frame
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = (float(v) for v in ee[:3])
        o = pose.pose.orientation
        o.x, o.y, o.z, o.w = (float(v) for v in ee[3:])
        self.pose_pub.publish(pose)
        markers = []
        for i, (colour, _body) in enumerate(sorted(self.env.scene.cubes.items())):
            pos, orn = self.env.scene.cube_pose(colour)
            m = Marker(ns="m2vla_cubes", id=i, type=Marker.CUBE, action=Marker.ADD)
            m.header.stamp, m.header.frame_id = stamp, frame
            m.pose.position.x, m.pose.position.y, m.pose.position.z = (float(v) for v in pos)
            m.pose.orientation.x, m.pose.orientation.y, m.pose.orientation.z, m.pose.orientation.w = (
                float(v) for v in orn)
            m.scale.x = m.scale.y = m.scale.z = CUBE_SIZE_M
            m.color.r, m.color.g, m.color.b, m.color.a = COLOURS_RGBA.get(colour, (0.5, 0.5, 0.5, 1.0))
            markers.append(m)
        grasp = Marker(ns="m2vla_grasp_point", id=0, type=Marker.SPHERE, action=Marker.ADD, pose=pose.pose)
        grasp.header.stamp, grasp.header.frame_id = stamp, frame
        grasp.scale.x = grasp.scale.y = grasp.scale.z = 0.015
        grasp.color.r, grasp.color.g, grasp.color.b, grasp.color.a = 1.0, 1.0, 1.0, 0.8
        markers.append(grasp)
        self.marker_pub.publish(MarkerArray(markers=markers))

    def _publish_task_status(self) -> None:
        spec = self.env.spec
        if spec is None:
            return
        msg = TaskStatus(task=spec.task, instruction=spec.instruction, seed=int(self._seed),
                         success=bool(self._last_success) if self._last_success is not None else bool(self.env.success()),
                         elapsed_s=float(self.env.time_s), episode=int(self._episode))
        msg.header.stamp = self.get_clock().now().to_msg()
        self.task_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        rejections = self.rejections.snapshot()
        items = {**self.counters, "task": self._task, "episode": self._episode,
                 "rejected_total": sum(rejections.values()), "last_rejection": self.rejections.last, **rejections}
        self.diag_pub.publish(diagnostic_array(
            "m2vla_sim", "pybullet", DiagnosticStatus.WARN if rejections else DiagnosticStatus.OK,
            f"{sum(rejections.values())} inputs refused" if rejections else "ok", items, self.get_clock().now().to_msg()))

    def destroy_node(self) -> None:
        try:
            self.env.close()
        finally:
            super().destroy_node()


def main(args: list[str] | None = None) -> None:
    # PyBullet is not thread-safe: one thread for every callback
    node_process.run("m2vla_sim", SimNode, SingleThreadedExecutor, args=args)


if __name__ == "__main__":
    main()
