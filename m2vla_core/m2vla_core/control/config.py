"""Controller settings: joint limits, workspace box, timing and staleness limits.

Everything the command stream needs to stay safe lives in one validated dataclass, passed
whole to ``ChunkStreamer``. Presets per robot (``get_preset``) carry the joint layout and the
limits of its description, so a node only overrides what differs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace

INTERPOLATIONS = ("linear", "cubic")
MAX_ENSEMBLE_CHUNKS = 64
MAX_ENSEMBLE_DECAY = 10.0


def check_ensemble_chunks(value, owner: str) -> None:
    """The one check of an ``ensemble_chunks`` field: the controller's and the evaluation
    rollout's (``RolloutConfig``, ``EvalConfig``), which must accept the same values."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ENSEMBLE_CHUNKS:
        raise ValueError(f"{owner}.ensemble_chunks must be an int in [1, {MAX_ENSEMBLE_CHUNKS}], got {value!r}")


def check_ensemble_decay(value, owner: str) -> None:
    """The one check of an ``ensemble_decay`` field (controller, rollout, eval): a finite number
    in [0, MAX_ENSEMBLE_DECAY]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0.0 <= value <= MAX_ENSEMBLE_DECAY:
        raise ValueError(f"{owner}.ensemble_decay must be a number in [0, {MAX_ENSEMBLE_DECAY}], got {value!r}")


def _finite_tuple(name: str, values, *, positive: bool = False) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    if positive and any(v <= 0 for v in out):
        raise ValueError(f"{name} must be > 0, got {out}")
    return out


@dataclass(frozen=True)
class JointLimits:
    """Per-joint limits in the controller's joint order (rad, rad/s, rad/s^2; metres for a gripper)."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    velocity: tuple[float, ...]  # max |dq/dt|
    acceleration: tuple[float, ...]  # max |d2q/dt2|

    def __post_init__(self) -> None:
        object.__setattr__(self, "lower", _finite_tuple("JointLimits.lower", self.lower))
        object.__setattr__(self, "upper", _finite_tuple("JointLimits.upper", self.upper))
        object.__setattr__(self, "velocity", _finite_tuple("JointLimits.velocity", self.velocity, positive=True))
        object.__setattr__(self, "acceleration",
                           _finite_tuple("JointLimits.acceleration", self.acceleration, positive=True))
        n = len(self.lower)
        for name in ("upper", "velocity", "acceleration"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"JointLimits.{name} has {len(getattr(self, name))} values, lower has {n}")
        if n == 0:
            raise ValueError("JointLimits must cover at least one joint")
        bad = [i for i in range(n) if not self.lower[i] < self.upper[i]]
        if bad:
            raise ValueError(f"JointLimits.lower must be < upper for every joint; violated at indices {bad}")

    @property
    def size(self) -> int:
        return len(self.lower)


@dataclass(frozen=True)
class WorkspaceBox:
    """Axis-aligned box [m] in the robot base frame that the end effector must stay inside."""

    lower_m: tuple[float, float, float] = (-1.0, -1.0, -0.05)
    upper_m: tuple[float, float, float] = (1.0, 1.0, 1.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lower_m", _finite_tuple("WorkspaceBox.lower_m", self.lower_m))
        object.__setattr__(self, "upper_m", _finite_tuple("WorkspaceBox.upper_m", self.upper_m))
        if len(self.lower_m) != 3 or len(self.upper_m) != 3:
            raise ValueError(f"WorkspaceBox corners must have 3 values, got {self.lower_m}, {self.upper_m}")
        if not all(lo < hi for lo, hi in zip(self.lower_m, self.upper_m)):
            raise ValueError(f"WorkspaceBox.lower_m must be < upper_m per axis, got {self.lower_m}, {self.upper_m}")


@dataclass(frozen=True)
class ControllerConfig:
    """How chunks become a command stream, and when the stream holds instead."""

    joint_names: tuple[str, ...]
    limits: JointLimits
    command_rate_hz: float = 250.0
    interpolation: str = "cubic"  # between chunk waypoints: "linear" | "cubic" (C1 Hermite)
    blend_s: float = 0.1  # cross-fade window from the commanded position into a new chunk
    # follow the mean of the newest N accepted chunks that still cover now (temporal ensembling,
    # ``ChunkEnsemble``); 1 = the newest chunk alone
    ensemble_chunks: int = 1
    # the ensemble's weights: exp(-decay * i), i = 0 for the oldest chunk covering now (0 = equal weights)
    ensemble_decay: float = 0.0
    max_chunk_age_s: float = 1.0  # a chunk whose observation is older than this on arrival is refused
    max_future_stamp_s: float = 0.05  # observation stamps this far ahead of now are refused (clock skew)
    chunk_timeout_s: float = 1.5  # hold when no chunk was accepted for this long (several 0.4 s policy periods)
    max_joint_state_age_s: float = 0.25  # hold when the newest joint state is older than this
    position_tolerance: float = 0.05  # chunk waypoints beyond limits by more than this are refused
    max_chunk_speed_factor: float = 3.0  # refuse chunks whose waypoint speed exceeds factor * velocity limit
    max_horizon: int = 1024  # refuse chunks with more waypoints
    workspace: WorkspaceBox | None = None  # checked only when a forward-kinematics callback is given
    # following-error fault: |command - measured| above this on a checked joint for longer than
    # following_error_time_s latches a hold at the measured position until reset (0 = off). It
    # catches an arm that is blocked, collided or not powered, which the commands alone cannot see.
    max_following_error: float = 0.0  # [rad | m]
    following_error_time_s: float = 0.5
    following_error_exempt: tuple[str, ...] = ()  # joints not checked (a gripper closed on an object lags by design)

    def __post_init__(self) -> None:
        object.__setattr__(self, "joint_names", tuple(str(n) for n in self.joint_names))
        object.__setattr__(self, "following_error_exempt", tuple(str(n) for n in self.following_error_exempt))
        if not self.joint_names or len(set(self.joint_names)) != len(self.joint_names):
            raise ValueError(f"ControllerConfig.joint_names must be non-empty and unique, got {self.joint_names}")
        if self.limits.size != len(self.joint_names):
            raise ValueError(f"ControllerConfig.limits cover {self.limits.size} joints, "
                             f"joint_names has {len(self.joint_names)}")
        checks = {
            "command_rate_hz": (1.0, 2000.0), "blend_s": (0.0, 5.0), "max_chunk_age_s": (1e-3, 60.0),
            "max_future_stamp_s": (0.0, 10.0), "chunk_timeout_s": (1e-3, 60.0),
            "max_joint_state_age_s": (1e-3, 60.0), "position_tolerance": (0.0, 1.0),
            "max_chunk_speed_factor": (1.0, 100.0), "max_following_error": (0.0, 10.0),
            "following_error_time_s": (0.0, 60.0),
        }
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ValueError(f"ControllerConfig.{name} must be a number in [{lo}, {hi}], got {value!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"ControllerConfig.interpolation must be one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")
        check_ensemble_chunks(self.ensemble_chunks, "ControllerConfig")
        check_ensemble_decay(self.ensemble_decay, "ControllerConfig")
        unknown = [n for n in self.following_error_exempt if n not in self.joint_names]
        if unknown:
            raise ValueError(f"ControllerConfig.following_error_exempt names {unknown}, which are not in joint_names "
                             f"{list(self.joint_names)}")
        if not isinstance(self.max_horizon, int) or not 1 <= self.max_horizon <= 1_000_000:
            raise ValueError(f"ControllerConfig.max_horizon must be an int in [1, 1e6], got {self.max_horizon!r}")

    @property
    def period_s(self) -> float:
        return 1.0 / self.command_rate_hz

    @property
    def following_error_checked(self) -> tuple[bool, ...]:
        """Per joint: whether the following-error fault watches it."""
        return tuple(self.max_following_error > 0 and n not in self.following_error_exempt for n in self.joint_names)

    def with_overrides(self, **changes) -> "ControllerConfig":
        return replace(self, **changes)


# ----------------------------------------------------------------------------- presets
# Franka Emika Panda (7 arm joints, datasheet limits) + the gripper opening [m] (sum of both
# fingers), the layout of the sim's actions and of the policy's joint-space chunks. The gripper
# limits suit the sim, whose demonstrations open/close in one 0.1 s step; the real Franka Hand
# is slower (about 0.1 m/s opening speed): lower them for a real arm.
PANDA_JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("gripper_opening",)
PANDA_LIMITS = JointLimits(
    lower=(-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973, 0.0),
    upper=(2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973, 0.08),
    velocity=(2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61, 0.5),
    acceleration=(15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0, 10.0),
)


@dataclass(frozen=True)
class _Preset:
    joint_names: tuple[str, ...]
    limits: JointLimits
    workspace: WorkspaceBox | None = field(default=None)


PRESETS: dict[str, _Preset] = {
    "panda": _Preset(PANDA_JOINT_NAMES, PANDA_LIMITS, WorkspaceBox((-0.2, -0.7, -0.02), (0.9, 0.7, 1.2))),
}


def get_preset(name: str, **overrides) -> ControllerConfig:
    """``ControllerConfig`` of a named robot; unknown names raise KeyError with the closest match."""
    try:
        preset = PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown robot preset {name!r}{hint}; known: {', '.join(PRESETS)}") from None
    base = {"joint_names": preset.joint_names, "limits": preset.limits, "workspace": preset.workspace}
    base.update(overrides)
    return ControllerConfig(**base)
