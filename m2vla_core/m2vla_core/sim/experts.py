"""Scripted experts: privileged (they read object poses from the simulator), IK-based.

Each expert turns the episode into a list of Cartesian waypoints for the grasp point (position,
gripper yaw, gripper opening, speed, hold time). ``act`` moves a Cartesian set-point toward the
current waypoint at a bounded speed, solves inverse kinematics for it
(``pybullet.calculateInverseKinematics`` with null-space limits and a rest pose, so the elbow
stays up), and returns the (8,) joint-position target for the next control period.
The gripper points straight down; yaw is chosen modulo 90 deg to match the cube's faces.

Closed-loop corrections where they matter: the place waypoints are recomputed from the held
cube's current offset in the hand, so a cube that slipped on grasp still lands on target.

``make_expert(env, resume=True)`` plans from whatever state the episode is in (a policy drove
before, DAgger-style takeover data): a cube already in the hand is carried on from where it is
instead of picked again, and the hand turns from its current yaw.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from m2vla_core.sim.scene import CUBE_SIZE_M, GRIPPER_MAX_OPENING_M, HOME_ARM_Q
from m2vla_core.sim.tasks import EpisodeSpec

OPEN_M = GRIPPER_MAX_OPENING_M
CLOSED_M = 0.0
SAFE_Z_M = 0.16  # carry height of the grasp point
FREE_SPEED_M_S = 0.30
NEAR_SPEED_M_S = 0.12
PUSH_SPEED_M_S = 0.08
MAX_YAW_RATE_RAD_S = 3.0
MAX_ACCEL_M_S2 = 1.2  # set-point acceleration limit: smooth starts and stops, no swinging cube
ZONE_RELEASE_Z_M = CUBE_SIZE_M / 2 + 0.006  # cube centre where the hand lets go over a zone
TRAY_RELEASE_Z_M = 0.065  # ... over a tray


@dataclass(frozen=True)
class ExpertConfig:
    """``noise_std_rad``: std of Gaussian noise the *recorder* adds to executed arm targets
    (DART-style recovery data: labels stay the clean expert actions). ``noise_stream``: which
    noise sequence; 0 is the seed's own, k > 0 another one, so one layout can be demonstrated
    with several different perturbations."""

    noise_std_rad: float = 0.0
    max_steps: int = 200
    noise_stream: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_std_rad <= 0.2:
            raise ValueError(f"ExpertConfig.noise_std_rad must be in [0, 0.2] rad, got {self.noise_std_rad}")
        if self.noise_stream < 0:
            raise ValueError(f"ExpertConfig.noise_stream must be >= 0, got {self.noise_stream}")
        if self.max_steps < 1:
            raise ValueError(f"ExpertConfig.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class Waypoint:
    pos: np.ndarray | None  # (3,) grasp-point target [m]; None = computed by ``update`` when reached
    yaw: float
    opening_m: float
    speed_m_s: float = FREE_SPEED_M_S
    hold_steps: int = 0  # control steps to wait after arriving (e.g. while the fingers close)
    tol_m: float = 0.012  # actual grasp point must be this close before moving on (or timeout)
    update: object = None  # optional callable(env) -> (3,) pos, re-evaluated every step
    name: str = ""
    precise: bool = False  # contact-rich phase (grasp, place, push): the recorder adds no noise here


def _grasp_yaw(cube_yaw: float) -> float:
    """Gripper yaw in [-pi/4, pi/4) whose fingers close on a pair of the cube's faces."""
    return float((cube_yaw + math.pi / 4) % (math.pi / 2) - math.pi / 4)


def _wrap_pi(angle: float) -> float:
    return float((angle + math.pi) % (2 * math.pi) - math.pi)


@dataclass
class ScriptedExpert:
    """Waypoint follower for one episode of ``env``; build with ``make_expert(env)`` after reset."""

    env: object
    waypoints: list[Waypoint]
    config: ExpertConfig = field(default_factory=ExpertConfig)

    start_yaw: float = 0.0  # the hand's yaw now (0 at home; resume plans pass the current one)

    def __post_init__(self) -> None:
        self._index = 0
        self._setpoint = self.env.scene.ee_pose()[:3].copy()
        self._yaw = float(self.start_yaw)
        self._held = 0
        self._waited = 0
        self._steps = 0
        self._speed = 0.0
        sc = self.env.scene
        self._lower = list(sc.joint_lower[:7]) + [0.0, 0.0]
        self._upper = list(sc.joint_upper[:7]) + [0.04, 0.04]
        self._ranges = [u - l for l, u in zip(self._lower, self._upper)]
        self._rest = list(HOME_ARM_Q) + [0.04, 0.04]

    @property
    def noise_allowed(self) -> bool:
        """False during precise phases, where perturbations would only produce failed demos."""
        wp = self.waypoints[min(self._index, len(self.waypoints) - 1)]
        return not wp.precise

    @property
    def done(self) -> bool:
        return self._index >= len(self.waypoints) or self._steps >= self.config.max_steps

    def reset(self) -> None:
        """Agent protocol: the plan is built per episode by make_expert, nothing to clear."""

    def act(self, observation=None) -> np.ndarray:
        """Next (8,) joint-position target (7 arm angles [rad] + gripper opening [m])."""
        self._steps += 1
        dt = self.env.config.control_dt_s
        wp = self.waypoints[min(self._index, len(self.waypoints) - 1)]
        goal = np.asarray(wp.update(self.env) if wp.update is not None else wp.pos, dtype=np.float64)
        delta = goal - self._setpoint
        dist = float(np.linalg.norm(delta))
        # Trapezoidal profile: accelerate at most MAX_ACCEL, and brake in time to stop at the goal.
        self._speed = min(wp.speed_m_s, self._speed + MAX_ACCEL_M_S2 * dt, math.sqrt(2 * MAX_ACCEL_M_S2 * dist))
        step = max(self._speed * dt, 1e-4)
        self._setpoint = goal.copy() if dist <= step else self._setpoint + delta / dist * step
        dyaw = _wrap_pi(wp.yaw - self._yaw)
        self._yaw += float(np.clip(dyaw, -MAX_YAW_RATE_RAD_S * dt, MAX_YAW_RATE_RAD_S * dt))
        if self._index < len(self.waypoints) and dist <= step and abs(_wrap_pi(wp.yaw - self._yaw)) < 1e-6:
            actual = self.env.scene.ee_pose()[:3]
            self._waited += 1
            if np.linalg.norm(actual - goal) <= wp.tol_m or self._waited > 10:
                self._held += 1
                if self._held > wp.hold_steps:
                    self._index += 1
                    self._held = 0
                    self._waited = 0
        return np.array([*self._ik(self._setpoint, self._yaw), wp.opening_m])

    def _ik(self, pos: np.ndarray, yaw: float) -> np.ndarray:
        sc = self.env.scene
        p = sc.p
        orn = p.getQuaternionFromEuler((math.pi, 0.0, yaw))
        q = p.calculateInverseKinematics(sc.robot, sc.ee_link, pos.tolist(), orn, lowerLimits=self._lower,
                                         upperLimits=self._upper, jointRanges=self._ranges, restPoses=self._rest,
                                         maxNumIterations=100, residualThreshold=1e-5, physicsClientId=sc.client)
        return np.asarray(q[:7], dtype=np.float64)


# ------------------------------------------------------------------------------- plans
def _pick(env, spec: EpisodeSpec) -> tuple[list[Waypoint], float]:
    pos, orn = env.scene.cube_pose(spec.cube)
    yaw = _grasp_yaw(env.scene.p.getEulerFromQuaternion(orn)[2])
    grasp = pos + np.array([0.0, 0.0, -0.002])
    above = np.array([pos[0], pos[1], SAFE_Z_M])
    return [
        Waypoint(above, yaw, OPEN_M, name="above cube"),
        Waypoint(np.array([pos[0], pos[1], pos[2] + 0.06]), yaw, OPEN_M, speed_m_s=NEAR_SPEED_M_S, name="pre-grasp"),
        Waypoint(grasp, yaw, OPEN_M, speed_m_s=NEAR_SPEED_M_S, tol_m=0.008, name="grasp",
                 precise=True),
        Waypoint(grasp, yaw, CLOSED_M, hold_steps=4, tol_m=1.0, name="close", precise=True),
        Waypoint(above, yaw, CLOSED_M, speed_m_s=NEAR_SPEED_M_S * 1.5, tol_m=0.02, name="lift"),
    ], yaw


def _hand_for_cube(spec: EpisodeSpec, target_xy, z: float):
    """Waypoint update: where the hand must be for the held cube's centre to be at (target_xy, z)."""
    estimate: list[np.ndarray] = []  # low-pass estimate of where the cube sits in the hand

    def update(e):
        cube, _ = e.scene.cube_pose(spec.cube)
        offset = cube - e.scene.ee_pose()[:3]
        if np.linalg.norm(offset[:2]) > 0.03:  # not held properly: aim the hand itself
            offset = np.zeros(3)
        # Filtered, so the hand follows a cube that slipped but not every swing in the fingers.
        estimate[:] = [offset if not estimate else 0.7 * estimate[0] + 0.3 * offset]
        return np.array([target_xy[0] - estimate[0][0], target_xy[1] - estimate[0][1], z - estimate[0][2]])
    return update


def _place_over(env, spec: EpisodeSpec, target_xy, release_z: float, yaw: float, align_yaw: float | None = None
                ) -> list[Waypoint]:
    """Carry the held cube over target_xy, lower it to release_z (cube centre), open, retreat."""
    hand_for_cube = functools.partial(_hand_for_cube, spec, target_xy)
    place_yaw = yaw if align_yaw is None else align_yaw
    carry = np.array([target_xy[0], target_xy[1], SAFE_Z_M])
    return [
        Waypoint(carry, place_yaw, CLOSED_M, tol_m=0.02, name="carry"),
        Waypoint(None, place_yaw, CLOSED_M, speed_m_s=NEAR_SPEED_M_S, tol_m=0.006, update=hand_for_cube(release_z),
                 name="lower", precise=True),
        Waypoint(None, place_yaw, OPEN_M, hold_steps=3, tol_m=1.0, update=lambda e: e.scene.ee_pose()[:3].copy(),
                 name="release", precise=True),
        Waypoint(None, place_yaw, OPEN_M, speed_m_s=NEAR_SPEED_M_S / 2, tol_m=0.01, precise=True,
                 update=_lift_off(), name="lift off"),
        Waypoint(np.array([target_xy[0], target_xy[1], SAFE_Z_M]), place_yaw, OPEN_M, speed_m_s=NEAR_SPEED_M_S,
                 tol_m=0.03, name="retreat"),
    ]


def _lift_off():
    """Straight up 4 cm from where the hand opened (fingers clear the cube without dragging it)."""
    start: list[np.ndarray] = []

    def update(e):
        if not start:
            start.append(e.scene.ee_pose()[:3] + np.array([0.0, 0.0, 0.04]))
        return start[0]
    return update


def _plan_reach(env, spec):
    pos, orn = env.scene.cube_pose(spec.cube)
    yaw = _grasp_yaw(env.scene.p.getEulerFromQuaternion(orn)[2])
    hover = np.array([pos[0], pos[1], pos[2] + 0.06])
    return [Waypoint(np.array([pos[0], pos[1], SAFE_Z_M]), yaw, OPEN_M, name="above"),
            Waypoint(hover, yaw, OPEN_M, speed_m_s=NEAR_SPEED_M_S, hold_steps=3, tol_m=0.006, name="hover",
                     precise=True)]


def _plan_push(env, spec):
    cube, _ = env.scene.cube_pose(spec.cube)
    zone = np.array(spec.layout.target("zone", spec.target).xy_m)
    d = zone - cube[:2]
    d /= np.linalg.norm(d)
    yaw = _wrap_pi(math.atan2(d[1], d[0]))
    yaw = yaw - math.pi if yaw > math.pi / 2 else (yaw + math.pi if yaw < -math.pi / 2 else yaw)
    z = CUBE_SIZE_M / 2 + 0.002
    back = CUBE_SIZE_M / 2 + 0.012  # cube centre to the finger surface
    start = cube[:2] - d * (back + 0.04)
    end = zone - d * (back - 0.005)  # a little past the centre: the cube lags the fingers slightly
    return [
        Waypoint(np.array([*start, SAFE_Z_M]), yaw, CLOSED_M, name="above start"),
        Waypoint(np.array([*start, z]), yaw, CLOSED_M, speed_m_s=NEAR_SPEED_M_S, tol_m=0.008, name="down",
                 precise=True),
        Waypoint(np.array([*end, z]), yaw, CLOSED_M, speed_m_s=PUSH_SPEED_M_S, tol_m=0.01, name="push",
                 precise=True),
        Waypoint(np.array([*(end - d * 0.04), z]), yaw, CLOSED_M, speed_m_s=PUSH_SPEED_M_S, tol_m=0.015,
                 name="back off"),
        Waypoint(np.array([*(end - d * 0.04), SAFE_Z_M - 0.04]), yaw, CLOSED_M, speed_m_s=NEAR_SPEED_M_S,
                 tol_m=0.03, name="up"),
    ]


def _plan_lift(env, spec):
    wps, yaw = _pick(env, spec)
    pos, _ = env.scene.cube_pose(spec.cube)
    wps.append(Waypoint(np.array([pos[0], pos[1], SAFE_Z_M + 0.02]), yaw, CLOSED_M, speed_m_s=NEAR_SPEED_M_S,
                        hold_steps=2, tol_m=0.02, name="hold up"))
    return wps


def _plan_place_zone(env, spec):
    wps, yaw = _pick(env, spec)
    zone = spec.layout.target("zone", spec.target).xy_m
    return wps + _place_over(env, spec, zone, ZONE_RELEASE_Z_M, yaw)


def _plan_tray(env, spec):
    wps, yaw = _pick(env, spec)
    tray = spec.layout.target("tray", spec.target).xy_m
    return wps + _place_over(env, spec, tray, TRAY_RELEASE_Z_M, yaw)


def _stack_release_z(base_z: float) -> float:
    """Top cube's centre where the hand lets go over a base cube centred at base_z."""
    return base_z + CUBE_SIZE_M + 0.004


def _stack_turn(env, spec) -> float:
    """Turn of the hand [rad] that lines the top cube's faces up with the base cube's."""
    p = env.scene.p
    _, base_orn = env.scene.cube_pose(spec.target)
    _, top_orn = env.scene.cube_pose(spec.cube)
    return _grasp_yaw(p.getEulerFromQuaternion(base_orn)[2] - p.getEulerFromQuaternion(top_orn)[2])


def _plan_stack(env, spec):
    wps, yaw = _pick(env, spec)
    base, _ = env.scene.cube_pose(spec.target)
    turn = _stack_turn(env, spec)
    return wps + _place_over(env, spec, base[:2], _stack_release_z(base[2]), yaw, align_yaw=yaw + turn)


# ------------------------------------------------------------------------------- resumed plans
HELD_MAX_XY_M = 0.03  # cube centre to grasp point, horizontally, for a cube between the fingers
HELD_MIN_LIFT_M = 0.01  # cube bottom above the table
REALIGN_CLEARANCE_M = 0.03  # held cube's centre above its release height while it moves over the target


def holds_cube(env, colour: str) -> bool:
    """The cube is in the hand: the fingers touch it, it is off the table, and it sits between them."""
    cube, _ = env.scene.cube_pose(colour)
    hand = env.scene.ee_pose()[:3]
    return (env.scene.finger_contact(colour) and cube[2] > CUBE_SIZE_M / 2 + HELD_MIN_LIFT_M
            and float(np.linalg.norm(cube[:2] - hand[:2])) < HELD_MAX_XY_M)


def hand_yaw(env) -> float:
    """Yaw [rad] of the hand's x axis in the world (the gripper points down: roll pi, pitch 0)."""
    x, y, z, w = env.scene.ee_pose()[3:]
    return float(math.atan2(2 * (x * y + z * w), 1 - 2 * (y * y + z * z)))


def _resume_place(env, spec: EpisodeSpec, target_xy, release_z: float, align_yaw: float | None = None
                  ) -> list[Waypoint]:
    """The held cube moves over the target at its current height (at least REALIGN_CLEARANCE_M
    above its release height), then is lowered and released as in ``_place_over``."""
    yaw = hand_yaw(env)
    cube, _ = env.scene.cube_pose(spec.cube)
    approach_z = max(float(cube[2]), release_z + REALIGN_CLEARANCE_M)
    place = _place_over(env, spec, target_xy, release_z, yaw, align_yaw)
    place_yaw = place[0].yaw
    realign = Waypoint(None, place_yaw, CLOSED_M, speed_m_s=NEAR_SPEED_M_S, tol_m=0.01,
                       update=_hand_for_cube(spec, target_xy, approach_z), name="realign")
    return [realign, *place[1:]]


def _resume_lift(env, spec):
    pos = env.scene.ee_pose()[:3]
    return [Waypoint(np.array([pos[0], pos[1], SAFE_Z_M + 0.02]), hand_yaw(env), CLOSED_M, speed_m_s=NEAR_SPEED_M_S,
                     hold_steps=2, tol_m=0.02, name="hold up")]


def _resume_place_zone(env, spec):
    return _resume_place(env, spec, spec.layout.target("zone", spec.target).xy_m, ZONE_RELEASE_Z_M)


def _resume_tray(env, spec):
    return _resume_place(env, spec, spec.layout.target("tray", spec.target).xy_m, TRAY_RELEASE_Z_M)


def _resume_stack(env, spec):
    base, _ = env.scene.cube_pose(spec.target)
    align_yaw = hand_yaw(env) + _stack_turn(env, spec)
    return _resume_place(env, spec, base[:2], _stack_release_z(base[2]), align_yaw=align_yaw)


# plans for a cube already in the hand; every other state gets the task's own plan from where things are
RESUME_HELD_PLANNERS = {
    "pick_lift": _resume_lift,
    "place_on_zone": _resume_place_zone,
    "stack": _resume_stack,
    "put_in_tray": _resume_tray,
}

PLANNERS = {
    "reach_above": _plan_reach,
    "push_to_zone": _plan_push,
    "pick_lift": _plan_lift,
    "place_on_zone": _plan_place_zone,
    "stack": _plan_stack,
    "put_in_tray": _plan_tray,
}


def make_expert(env, config: ExpertConfig | None = None, *, resume: bool = False) -> ScriptedExpert:
    """Expert for the episode ``env`` was last reset to (plans from the current object poses).
    ``resume``: the episode is under way (see the module docstring); the plan starts from the hand's
    current pose and yaw, and carries on with a cube that is already held."""
    if env.spec is None:
        raise RuntimeError("reset the env before making an expert")
    task = env.spec.task
    planner = PLANNERS.get(task)
    if planner is None:
        raise KeyError(f"no scripted expert for task {task!r}")
    if not resume:
        return ScriptedExpert(env, planner(env, env.spec), config or ExpertConfig())
    if task in RESUME_HELD_PLANNERS and holds_cube(env, env.spec.cube):
        planner = RESUME_HELD_PLANNERS[task]
    return ScriptedExpert(env, planner(env, env.spec), config or ExpertConfig(), start_yaw=hand_yaw(env))


class ExpertAgent:
    """The expert behind the evaluation ``Agent`` protocol: ``reset()`` plans for the episode the
    env was just reset to, ``act`` returns a (1, 8) chunk (one control step, then re-plan)."""

    def __init__(self, env, config: ExpertConfig | None = None) -> None:
        self.env = env
        self.config = config or ExpertConfig()
        self._expert: ScriptedExpert | None = None

    def reset(self) -> None:
        self._expert = make_expert(self.env, self.config)

    def act(self, observation) -> np.ndarray:
        if self._expert is None:
            raise RuntimeError("call reset() after env.reset() and before act()")
        return self._expert.act(observation)[None, :]  # (1, 8)


def run_expert_episode(env, task: str, seed: int, config: ExpertConfig | None = None,
                       on_step=None) -> tuple[bool, int]:
    """Reset, run the expert until its plan ends; returns (success, steps).

    ``on_step(obs, clean_action, executed_action)`` sees every step (the recorder uses it).
    Noise (``config.noise_std_rad``) is added to the executed arm targets only, outside the
    precise phases, from a generator seeded by the episode seed (reproducible recordings).
    """
    config = config or ExpertConfig()
    obs = env.reset(task, seed)
    return drive_expert(env, obs, make_expert(env, config), seed, on_step)


def drive_expert(env, obs, expert: ScriptedExpert, seed: int, on_step=None) -> tuple[bool, int]:
    """Run ``expert`` from ``obs`` (the env's current observation) until its plan ends; returns
    (success, steps). Noise and ``on_step`` as in ``run_expert_episode``."""
    config = expert.config
    stream = [int(config.noise_stream)] if config.noise_stream else []  # stream 0: recordings made before it existed
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919, *stream]))
    steps = 0
    while not expert.done:
        action = expert.act(obs)
        executed = action.copy()
        if config.noise_std_rad > 0:
            noise = rng.normal(0.0, config.noise_std_rad, size=7)  # drawn every step: one stream per seed
            if expert.noise_allowed:
                executed[:7] += noise
        if on_step is not None:
            on_step(obs, action, executed)
        obs = env.step(executed)
        steps += 1
    if on_step is not None:
        on_step(obs, None, None)
    return env.success(), steps
