"""The PyBullet world: a Panda on a table, coloured cubes, flat target zones, a tray, cameras.

Everything here is rebuilt from scratch on every reset (``resetSimulation``) so that an
episode depends only on its layout, never on what ran before in the same process: that is
what makes "same seed -> bit-identical observations" hold.

Frames: the robot base sits at the world origin, the table top is the plane z = 0, the robot
faces +x. Lengths in metres, angles in radians.
"""

from __future__ import annotations

import contextlib
import os
import pkgutil
from dataclasses import dataclass, field

import numpy as np

from m2vla_core.robot_model import panda_urdf_path

ARM_JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINT_NAMES = ("panda_finger_joint1", "panda_finger_joint2")
EE_LINK_NAME = "panda_grasptarget"
# Observation / action layout: 7 arm joint angles [rad] + gripper opening [m] (sum of both fingers).
STATE_NAMES = (*ARM_JOINT_NAMES, "gripper_opening")
GRIPPER_MAX_OPENING_M = 0.08
# A comfortable, collision-free arm pose above the table (gripper pointing down).
HOME_ARM_Q = (0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785)

COLOURS_RGBA: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.10, 1.0),
    "green": (0.15, 0.70, 0.20, 1.0),
    "blue": (0.12, 0.30, 0.90, 1.0),
    "yellow": (0.95, 0.85, 0.10, 1.0),
}
TABLE_RGBA = (0.62, 0.52, 0.40, 1.0)

CUBE_SIZE_M = 0.04
CUBE_MASS_KG = 0.05
ZONE_SIZE_M = 0.10  # flat square pad, visual only (a cube slides over it freely)
TRAY_SIZE_M = 0.15  # outer footprint
TRAY_WALL_HEIGHT_M = 0.03
TRAY_WALL_THICKNESS_M = 0.008
TRAY_FLOOR_THICKNESS_M = 0.006
RENDERERS = ("auto", "egl", "tiny")


@dataclass(frozen=True)
class CameraConfig:
    """A fixed pinhole camera looking at the workspace (default: from in front of the robot)."""

    eye_m: tuple[float, float, float] = (1.05, 0.0, 0.85)
    target_m: tuple[float, float, float] = (0.40, 0.0, 0.10)
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    fov_deg: float = 55.0
    near_m: float = 0.05
    far_m: float = 3.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.fov_deg <= 170.0:
            raise ValueError(f"CameraConfig.fov_deg must be in [1, 170], got {self.fov_deg}")
        if not 0.0 < self.near_m < self.far_m:
            raise ValueError(f"CameraConfig.near_m/far_m must satisfy 0 < near < far, got {self.near_m}, {self.far_m}")
        if np.allclose(self.eye_m, self.target_m):
            raise ValueError(f"CameraConfig.eye_m must differ from target_m, got {self.eye_m}")

    def project(self, points_m: np.ndarray, aspect: float = 1.0) -> np.ndarray:
        """(N, 3) world points [m] -> (N, 2) image coordinates (u to the right, v down, both 0..1
        across the frame): the pinhole model of the view and projection matrices PyBullet renders
        with. Labels for training, e.g. which image token an object falls on."""
        points = np.asarray(points_m, dtype=np.float64).reshape(-1, 3)
        eye = np.asarray(self.eye_m, dtype=np.float64)
        forward = np.asarray(self.target_m, dtype=np.float64) - eye
        forward /= np.linalg.norm(forward)
        side = np.cross(forward, self.up)
        side /= np.linalg.norm(side)
        up = np.cross(side, forward)
        rel = points - eye
        depth = rel @ forward
        tan_half = np.tan(np.radians(self.fov_deg) / 2.0)
        ndc_x = (rel @ side) / (depth * tan_half * aspect)
        ndc_y = (rel @ up) / (depth * tan_half)
        return np.stack([(ndc_x + 1.0) / 2.0, (1.0 - ndc_y) / 2.0], axis=1)


@dataclass(frozen=True)
class SimConfig:
    """Simulation settings. ``control_dt_s`` is the period of ``TaskEnv.step``; physics runs at
    ``physics_hz`` underneath, so one step = round(control_dt_s * physics_hz) substeps."""

    control_dt_s: float = 0.1
    physics_hz: float = 240.0
    image_width: int = 224
    image_height: int = 224
    camera: CameraConfig = field(default_factory=CameraConfig)
    wrist_camera: bool = False
    wrist_fov_deg: float = 70.0
    render: bool = True  # False: observations carry image=None (fast tests, expert statistics)
    # "tiny" (default): CPU TinyRenderer, identical images on every machine; "egl": the EGL plugin
    # (needs Mesa/GPU drivers; on llvmpipe it was no faster here, ~33 ms vs ~32 ms at 224x224 with
    # the Panda meshes); "auto": EGL if the plugin loads, else TinyRenderer.
    renderer: str = "tiny"
    arm_max_force_nm: tuple[float, ...] = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
    finger_max_force_n: float = 40.0
    interpolate_commands: bool = True  # step(): ramp the arm target linearly over the substeps

    def __post_init__(self) -> None:
        if not 0.0 < self.control_dt_s <= 1.0:
            raise ValueError(f"SimConfig.control_dt_s must be in (0, 1] s, got {self.control_dt_s}")
        if not 30.0 <= self.physics_hz <= 2000.0:
            raise ValueError(f"SimConfig.physics_hz must be in [30, 2000], got {self.physics_hz}")
        substeps = self.control_dt_s * self.physics_hz
        if abs(substeps - round(substeps)) > 1e-6 or round(substeps) < 1:
            raise ValueError(f"SimConfig.control_dt_s * physics_hz must be a positive integer, got "
                             f"{self.control_dt_s} * {self.physics_hz} = {substeps}")
        for name in ("image_width", "image_height"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 8 <= value <= 2048:
                raise ValueError(f"SimConfig.{name} must be an int in [8, 2048], got {value!r}")
        if not 10.0 <= self.wrist_fov_deg <= 170.0:
            raise ValueError(f"SimConfig.wrist_fov_deg must be in [10, 170], got {self.wrist_fov_deg}")
        if self.renderer not in RENDERERS:
            raise ValueError(f"SimConfig.renderer must be one of {RENDERERS}, got {self.renderer!r}")
        if len(self.arm_max_force_nm) != 7 or min(self.arm_max_force_nm) <= 0:
            raise ValueError(f"SimConfig.arm_max_force_nm must be 7 positive values, got {self.arm_max_force_nm}")
        if self.finger_max_force_n <= 0:
            raise ValueError(f"SimConfig.finger_max_force_n must be > 0, got {self.finger_max_force_n}")

    @property
    def substeps(self) -> int:
        return int(round(self.control_dt_s * self.physics_hz))


@dataclass(frozen=True)
class CubeSpec:
    colour: str
    xy_m: tuple[float, float]
    yaw_rad: float


@dataclass(frozen=True)
class TargetSpec:
    """A zone (flat pad) or tray; ``kind`` is "zone" or "tray"."""

    kind: str
    colour: str
    xy_m: tuple[float, float]


@dataclass(frozen=True)
class Layout:
    cubes: tuple[CubeSpec, ...]
    targets: tuple[TargetSpec, ...]

    def cube(self, colour: str) -> CubeSpec:
        for c in self.cubes:
            if c.colour == colour:
                return c
        raise KeyError(f"no {colour} cube in this layout")

    def target(self, kind: str, colour: str) -> TargetSpec:
        for t in self.targets:
            if t.kind == kind and t.colour == colour:
                return t
        raise KeyError(f"no {colour} {kind} in this layout")


@contextlib.contextmanager
def _quiet_stdout():
    """The EGL plugin prints driver banners from C; keep them off our stdout."""
    try:
        fd = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


class Scene:
    """One private PyBullet DIRECT client holding the world of the current episode."""

    def __init__(self, config: SimConfig) -> None:
        import pybullet as p

        self.p = p
        self.config = config
        self.client = p.connect(p.DIRECT)
        self.renderer_name = "none"
        self._egl_plugin = None
        self._renders = 0
        if config.render and config.renderer in ("auto", "egl"):
            self._egl_plugin = self._load_egl()
            if self._egl_plugin is None and config.renderer == "egl":
                raise RuntimeError("SimConfig.renderer='egl' but the PyBullet EGL renderer plugin did not load")
        if config.render:
            self.renderer_name = "egl" if self._egl_plugin is not None else "tiny"
        self.robot = -1
        self.cubes: dict[str, int] = {}
        self.targets: dict[tuple[str, str], int] = {}
        self._view = p.computeViewMatrix(config.camera.eye_m, config.camera.target_m, config.camera.up,
                                         physicsClientId=self.client)
        aspect = config.image_width / config.image_height
        self._proj = p.computeProjectionMatrixFOV(config.camera.fov_deg, aspect, config.camera.near_m,
                                                  config.camera.far_m, physicsClientId=self.client)
        self._wrist_proj = p.computeProjectionMatrixFOV(config.wrist_fov_deg, aspect, 0.01, 2.0,
                                                        physicsClientId=self.client)
        self.arm_joints: list[int] = []
        self.finger_joints: list[int] = []
        self.ee_link = -1
        self.joint_lower = np.zeros(8)
        self.joint_upper = np.zeros(8)

    def _load_egl(self) -> int | None:
        loader = pkgutil.get_loader("eglRenderer")
        if loader is None:
            return None
        try:
            with _quiet_stdout():
                plugin = self.p.loadPlugin(loader.get_filename(), "_eglRendererPlugin", physicsClientId=self.client)
        except Exception:  # noqa: BLE001 - any failure means: use TinyRenderer
            return None
        return plugin if plugin >= 0 else None

    # ----------------------------------------------------------------------------- building
    def build(self, layout: Layout) -> None:
        p, cid = self.p, self.client
        p.resetSimulation(physicsClientId=cid)
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / self.config.physics_hz, numSolverIterations=80,
                                    deterministicOverlappingPairs=1, physicsClientId=cid)
        self._box(half_m=(0.65, 0.75, 0.025), pos=(0.35, 0.0, -0.025), rgba=TABLE_RGBA, mass=0.0)
        self.robot = p.loadURDF(str(panda_urdf_path()), basePosition=(0, 0, 0), useFixedBase=True,
                                flags=p.URDF_USE_SELF_COLLISION_EXCLUDE_PARENT, physicsClientId=cid)
        by_name = {}
        for j in range(p.getNumJoints(self.robot, physicsClientId=cid)):
            info = p.getJointInfo(self.robot, j, physicsClientId=cid)
            by_name[info[1].decode()] = j
            if info[12].decode() == EE_LINK_NAME:
                self.ee_link = j
        self.arm_joints = [by_name[n] for n in ARM_JOINT_NAMES]
        self.finger_joints = [by_name[n] for n in FINGER_JOINT_NAMES]
        lower, upper = [], []
        for j in self.arm_joints:
            info = p.getJointInfo(self.robot, j, physicsClientId=cid)
            lower.append(info[8])
            upper.append(info[9])
        finger_info = p.getJointInfo(self.robot, self.finger_joints[0], physicsClientId=cid)
        lower.append(2 * finger_info[8])
        upper.append(2 * finger_info[9])
        self.joint_lower, self.joint_upper = np.array(lower), np.array(upper)
        for j in self.finger_joints:
            p.changeDynamics(self.robot, j, lateralFriction=1.5, spinningFriction=0.05, physicsClientId=cid)
        for j, q in zip(self.arm_joints, HOME_ARM_Q):
            p.resetJointState(self.robot, j, q, physicsClientId=cid)
        for j in self.finger_joints:
            p.resetJointState(self.robot, j, GRIPPER_MAX_OPENING_M / 2, physicsClientId=cid)

        self.targets = {}
        for t in layout.targets:
            if t.kind == "zone":
                self.targets[(t.kind, t.colour)] = self._zone(t)
            elif t.kind == "tray":
                self.targets[(t.kind, t.colour)] = self._tray(t)
            else:
                raise ValueError(f"unknown target kind {t.kind!r}")
        self.cubes = {}
        h = CUBE_SIZE_M / 2
        for c in layout.cubes:
            body = self._box(half_m=(h, h, h), pos=(c.xy_m[0], c.xy_m[1], h), rgba=COLOURS_RGBA[c.colour],
                             mass=CUBE_MASS_KG, yaw=c.yaw_rad)
            p.changeDynamics(body, -1, lateralFriction=1.0, spinningFriction=0.05, rollingFriction=0.0,
                             physicsClientId=cid)
            self.cubes[c.colour] = body

    def _box(self, half_m, pos, rgba, mass: float, yaw: float = 0.0, collide: bool = True) -> int:
        p, cid = self.p, self.client
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half_m, physicsClientId=cid) if collide else -1
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half_m, rgbaColor=rgba, physicsClientId=cid)
        orn = p.getQuaternionFromEuler((0, 0, yaw))
        return p.createMultiBody(baseMass=mass, baseCollisionShapeIndex=col, baseVisualShapeIndex=vis,
                                 basePosition=pos, baseOrientation=orn, physicsClientId=cid)

    def _zone(self, t: TargetSpec) -> int:
        h = ZONE_SIZE_M / 2
        return self._box(half_m=(h, h, 0.0005), pos=(t.xy_m[0], t.xy_m[1], 0.0005), rgba=COLOURS_RGBA[t.colour],
                         mass=0.0, collide=False)

    def _tray(self, t: TargetSpec) -> int:
        """A static tray: a floor and four low walls in one body (compound collision shape)."""
        p, cid = self.p, self.client
        s, w, hw = TRAY_SIZE_M / 2, TRAY_WALL_THICKNESS_M / 2, TRAY_WALL_HEIGHT_M / 2
        f = TRAY_FLOOR_THICKNESS_M / 2
        halves = [(s, s, f), (w, s, hw), (w, s, hw), (s, w, hw), (s, w, hw)]
        offsets = [(0, 0, f), (s - w, 0, hw), (-(s - w), 0, hw), (0, s - w, hw), (0, -(s - w), hw)]
        col = p.createCollisionShapeArray([p.GEOM_BOX] * 5, halfExtents=halves, collisionFramePositions=offsets,
                                          physicsClientId=cid)
        vis = p.createVisualShapeArray([p.GEOM_BOX] * 5, halfExtents=halves, visualFramePositions=offsets,
                                       physicsClientId=cid)
        body = p.createMultiBody(baseMass=0.0, baseCollisionShapeIndex=col, baseVisualShapeIndex=vis,
                                 basePosition=(t.xy_m[0], t.xy_m[1], 0.0), physicsClientId=cid)
        rgba = COLOURS_RGBA[t.colour]
        p.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=cid)
        return body

    # ----------------------------------------------------------------------------- state
    def arm_state(self) -> np.ndarray:
        """(8,) = 7 arm joint angles [rad] + gripper opening [m]."""
        states = self.p.getJointStates(self.robot, self.arm_joints + self.finger_joints, physicsClientId=self.client)
        q = [s[0] for s in states]
        return np.array(q[:7] + [q[7] + q[8]], dtype=np.float64)

    def ee_pose(self) -> np.ndarray:
        """(7,) grasp-target position [m] + orientation quaternion (x, y, z, w) in the world frame."""
        st = self.p.getLinkState(self.robot, self.ee_link, computeForwardKinematics=True, physicsClientId=self.client)
        return np.array([*st[4], *st[5]], dtype=np.float64)

    def cube_pose(self, colour: str) -> tuple[np.ndarray, np.ndarray]:
        pos, orn = self.p.getBasePositionAndOrientation(self.cubes[colour], physicsClientId=self.client)
        return np.array(pos), np.array(orn)

    def finger_contact(self, colour: str) -> bool:
        """True when either finger touches the cube (it is held or being pushed by the fingers)."""
        for j in self.finger_joints:
            if self.p.getContactPoints(self.robot, self.cubes[colour], j, -1, physicsClientId=self.client):
                return True
        return False

    def robot_contact(self, colour: str) -> bool:
        return bool(self.p.getContactPoints(self.robot, self.cubes[colour], physicsClientId=self.client))

    def set_cube_pose(self, colour: str, pos, yaw: float = 0.0) -> None:
        """Teleport a cube (tests of success checks, scene editing)."""
        orn = self.p.getQuaternionFromEuler((0, 0, yaw))
        self.p.resetBasePositionAndOrientation(self.cubes[colour], pos, orn, physicsClientId=self.client)
        self.p.resetBaseVelocity(self.cubes[colour], (0, 0, 0), (0, 0, 0), physicsClientId=self.client)

    # ----------------------------------------------------------------------------- control
    def command(self, arm_q: np.ndarray, opening_m: float) -> None:
        p, cid = self.p, self.client
        p.setJointMotorControlArray(self.robot, self.arm_joints, p.POSITION_CONTROL, targetPositions=list(arm_q),
                                    forces=list(self.config.arm_max_force_nm), physicsClientId=cid)
        half = float(opening_m) / 2
        p.setJointMotorControlArray(self.robot, self.finger_joints, p.POSITION_CONTROL, targetPositions=[half, half],
                                    forces=[self.config.finger_max_force_n] * 2, physicsClientId=cid)

    def step(self) -> None:
        self.p.stepSimulation(physicsClientId=self.client)

    # ----------------------------------------------------------------------------- cameras
    def render(self) -> np.ndarray:
        return self._render(self._view, self._proj)

    def render_wrist(self) -> np.ndarray:
        """Camera on the hand, looking along the gripper's approach axis."""
        p = self.p
        st = p.getLinkState(self.robot, self.ee_link, computeForwardKinematics=True, physicsClientId=self.client)
        pos, orn = np.array(st[4]), st[5]
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)  # (3, 3) columns = link axes in world
        eye = pos - 0.12 * rot[:, 2] + 0.085 * rot[:, 0]  # beside the hand, behind the fingertips
        view = p.computeViewMatrix(eye, pos + 0.12 * rot[:, 2], rot[:, 0], physicsClientId=self.client)
        return self._render(view, self._wrist_proj)

    def _render(self, view, proj) -> np.ndarray:
        p, cfg = self.p, self.config
        renderer = p.ER_BULLET_HARDWARE_OPENGL if self._egl_plugin is not None else p.ER_TINY_RENDERER
        # The EGL plugin prints a banner on its first frames; silence those only (fd-level redirect).
        quiet = _quiet_stdout() if self._egl_plugin is not None and self._renders < 3 else contextlib.nullcontext()
        with quiet:
            _, _, rgba, _, _ = p.getCameraImage(cfg.image_width, cfg.image_height, view, proj, renderer=renderer,
                                                flags=p.ER_NO_SEGMENTATION_MASK, shadow=0,
                                                physicsClientId=self.client)
        self._renders += 1
        rgba = np.asarray(rgba, dtype=np.uint8).reshape(cfg.image_height, cfg.image_width, 4)  # (H, W, 4)
        return np.ascontiguousarray(rgba[:, :, :3])  # (H, W, 3)

    def close(self) -> None:
        if self.client is not None and self.client >= 0:
            try:
                if self._egl_plugin is not None:
                    with _quiet_stdout():
                        self.p.unloadPlugin(self._egl_plugin, physicsClientId=self.client)
                self.p.disconnect(self.client)
            finally:
                self.client = -1
