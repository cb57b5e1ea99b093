"""``TaskEnv``: the plain-Python simulation API used by recording, evaluation and the ROS sim node.

Two levels of control:
- ``step(action)`` at the control period (``SimConfig.control_dt_s``): the arm target is
  ramped linearly from the previous command over the physics substeps, then one observation
  is returned. This is what policies and the scripted experts use.
- ``apply_joint_command(q)`` + ``step_physics(dt_s)``: a caller that owns timing (the ROS sim
  node, fed by the controller at its command rate) sets targets and advances physics itself.

Action and ``Observation.joint_positions`` share one layout, (8,) = 7 arm joint angles [rad]
+ gripper opening [m] (distance between the fingers, 0..0.08); the two finger joints are
driven symmetrically to opening / 2 each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from m2vla_core.sim.scene import (
    ARM_JOINT_NAMES, FINGER_JOINT_NAMES, HOME_ARM_Q, GRIPPER_MAX_OPENING_M, STATE_NAMES, Scene, SimConfig,
)
from m2vla_core.sim.tasks import EpisodeSpec, get_task

ACTION_DIM = 8


@dataclass
class Observation:
    image: np.ndarray | None  # (H, W, 3) uint8 from the fixed camera; None when SimConfig.render is False
    joint_positions: np.ndarray  # (8,) float64: 7 arm angles [rad] + gripper opening [m]
    ee_pose: np.ndarray  # (7,) grasp point position [m] + quaternion (x, y, z, w), world frame
    instruction: str
    task: str
    time_s: float  # simulated time since reset
    step: int  # control steps since reset
    wrist_image: np.ndarray | None = None  # (H, W, 3) uint8 when SimConfig.wrist_camera
    named_objects_xy: np.ndarray | None = None  # (4,) [m] EpisodeSpec.named_objects_xy: privileged diagnostics only
    named_object_keys: tuple[str, str] | None = None  # EpisodeSpec.named_object_keys, for the same diagnostics


@dataclass
class EpisodeTracker:
    """Per-episode history the success checks need (e.g. was the cube ever lifted?)."""

    max_z: dict[str, float] = field(default_factory=dict)
    start_xy: dict[str, tuple[float, float]] = field(default_factory=dict)

    def update(self, scene: Scene) -> None:
        for colour in scene.cubes:
            z = float(scene.cube_pose(colour)[0][2])
            if z > self.max_z.get(colour, -np.inf):
                self.max_z[colour] = z


class TaskEnv:
    """A Panda, coloured cubes, zones and a tray; ``reset(task, seed)`` starts an episode."""

    joint_names: tuple[str, ...] = ARM_JOINT_NAMES + FINGER_JOINT_NAMES  # simulator joints (for /joint_states)
    state_names: tuple[str, ...] = STATE_NAMES  # layout of actions and Observation.joint_positions

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.scene = Scene(self.config)
        self.spec: EpisodeSpec | None = None
        self._named_objects_xy: np.ndarray | None = None  # the episode's constant, set once per reset
        self.tracker = EpisodeTracker()
        self._command = np.zeros(ACTION_DIM)
        self._time_s = 0.0
        self._steps = 0
        self._physics_steps = 0
        # Limits are read from the URDF at the first reset; build a default world now so they exist.
        from m2vla_core.sim.tasks import sample_layout

        self.scene.build(sample_layout(np.random.default_rng(0)))

    # ----------------------------------------------------------------------------- properties
    @property
    def renderer(self) -> str:
        """"egl", "tiny" or "none" (render off): datasets record it, images differ between them."""
        return self.scene.renderer_name

    @property
    def joint_lower(self) -> np.ndarray:
        """(8,) lower limits of the action / state layout, from the URDF."""
        return self.scene.joint_lower.copy()

    @property
    def joint_upper(self) -> np.ndarray:
        return self.scene.joint_upper.copy()

    @property
    def time_s(self) -> float:
        return self._time_s

    @property
    def home_action(self) -> np.ndarray:
        return np.array([*HOME_ARM_Q, GRIPPER_MAX_OPENING_M])

    # ----------------------------------------------------------------------------- episode
    def reset(self, task_name: str, seed: int) -> Observation:
        """Rebuild the world for (task, seed) from scratch; identical seeds give identical episodes."""
        spec = get_task(task_name).make_episode(seed)
        self.spec = spec
        self._named_objects_xy = spec.named_objects_xy()
        self._named_objects_xy.setflags(write=False)  # shared by every observation of the episode
        self.scene.build(spec.layout)
        self._command = self.home_action
        self.scene.command(self._command[:7], self._command[7])
        self._time_s = 0.0
        self._steps = 0
        self._physics_steps = 0
        self.tracker = EpisodeTracker()
        for colour in self.scene.cubes:
            pos, _ = self.scene.cube_pose(colour)
            self.tracker.start_xy[colour] = (float(pos[0]), float(pos[1]))
        self.step_physics(0.1)  # let the cubes settle onto the table; not counted as episode time
        self._time_s = 0.0
        self.tracker = EpisodeTracker(start_xy=self.tracker.start_xy)
        self.tracker.update(self.scene)
        return self.observe()

    def step(self, action) -> Observation:
        """Execute one control period toward the (8,) joint-position target; return the new observation."""
        target = self._check_action(action)
        previous = self._command.copy()
        n = self.config.substeps
        for i in range(1, n + 1):
            if self.config.interpolate_commands:
                arm = previous[:7] + (target[:7] - previous[:7]) * (i / n)
            else:
                arm = target[:7]
            self.scene.command(arm, target[7])
            self.scene.step()
        self._command = target
        self._physics_steps += n
        self._time_s += n / self.config.physics_hz
        self._steps += 1
        self.tracker.update(self.scene)
        return self.observe()

    def success(self) -> bool:
        self._require_episode()
        return bool(get_task(self.spec.task).success(self.scene, self.spec, self.tracker))

    def observe(self) -> Observation:
        self._require_episode()
        image = self.scene.render() if self.config.render else None
        wrist = self.scene.render_wrist() if (self.config.render and self.config.wrist_camera) else None
        return Observation(image=image, joint_positions=self.scene.arm_state(), ee_pose=self.scene.ee_pose(),
                           instruction=self.spec.instruction, task=self.spec.task, time_s=self._time_s,
                           step=self._steps, wrist_image=wrist, named_objects_xy=self._named_objects_xy,
                           named_object_keys=self.spec.named_object_keys())

    # ----------------------------------------------------------------------------- low level
    def apply_joint_command(self, q) -> None:
        """Set the (8,) joint-position target held until the next command (no ramp)."""
        self._require_episode()
        self._command = self._check_action(q)
        self.scene.command(self._command[:7], self._command[7])

    def step_physics(self, dt_s: float) -> int:
        """Advance physics by dt_s (rounded to whole physics steps); returns the steps taken."""
        if not np.isfinite(dt_s) or dt_s < 0:
            raise ValueError(f"dt_s must be finite and >= 0, got {dt_s}")
        n = int(round(dt_s * self.config.physics_hz))
        for _ in range(n):
            self.scene.step()
        self._physics_steps += n
        self._time_s += n / self.config.physics_hz
        self.tracker.update(self.scene)
        return n

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions and velocities of ``joint_names`` (9 simulator joints), for /joint_states."""
        sc = self.scene
        states = sc.p.getJointStates(sc.robot, sc.arm_joints + sc.finger_joints, physicsClientId=sc.client)
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def close(self) -> None:
        self.scene.close()

    def __enter__(self) -> "TaskEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_episode(self) -> None:
        if self.spec is None:
            raise RuntimeError("call reset(task_name, seed) first")

    def _check_action(self, action) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},) = 7 arm angles [rad] + gripper opening [m], "
                             f"got {np.shape(action)}")
        if not np.isfinite(a).all():
            raise ValueError(f"action must be finite, got {a}")
        return np.clip(a, self.scene.joint_lower, self.scene.joint_upper)  # the URDF limits bound every target
