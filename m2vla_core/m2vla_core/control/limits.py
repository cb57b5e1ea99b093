"""One command-period step of position / velocity / acceleration limiting.

The target comes from the interpolated chunk; the command moves from the previous command
toward it no faster than the velocity limit, changes velocity no faster than the
acceleration limit, and never leaves the position limits. The target's own velocity is fed
forward, and the approach speed relative to the target is capped by the stopping distance
sqrt(2 a d), so a step in the target is reached without overshoot while a smoothly moving
target is tracked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m2vla_core.control.config import JointLimits

_EPS = 1e-9


@dataclass(frozen=True)
class LimitResult:
    position: np.ndarray  # (A,) the command
    velocity: np.ndarray  # (A,) (position - previous) / period
    position_clamped: bool
    velocity_clamped: bool
    acceleration_clamped: bool

    @property
    def clamped(self) -> bool:
        return self.position_clamped or self.velocity_clamped or self.acceleration_clamped


def limit_step(target: np.ndarray, previous_target: np.ndarray | None, previous: np.ndarray,
               previous_velocity: np.ndarray, period_s: float, limits: JointLimits) -> LimitResult:
    lo, hi = np.asarray(limits.lower), np.asarray(limits.upper)  # (A,)
    vmax, amax = np.asarray(limits.velocity), np.asarray(limits.acceleration)  # (A,)
    t = float(period_s)
    goal = np.clip(target, lo, hi)  # (A,)
    position_clamped = bool(np.any(np.abs(goal - target) > _EPS))
    if previous_target is None:
        v_goal = np.zeros_like(goal)
    else:
        v_goal = np.clip((goal - np.clip(previous_target, lo, hi)) / t, -vmax, vmax)  # target's velocity
    d = goal - previous  # (A,)
    relative = d / t - v_goal  # approach speed relative to the moving target
    # discrete-time stopping speed: braking by amax*T per period covers at most |d| (about sqrt(2 a d))
    stop_cap = amax * t * (np.sqrt(0.25 + 2.0 * np.abs(d) / (amax * t * t)) - 0.5)
    relative_capped = np.clip(relative, -stop_cap, stop_cap)
    v = v_goal + relative_capped
    v_limited = np.clip(v, -vmax, vmax)
    v_accel = np.clip(v_limited, previous_velocity - amax * t, previous_velocity + amax * t)
    velocity_clamped = bool(np.any(np.abs(v_limited - v) > _EPS))
    acceleration_clamped = bool(np.any(np.abs(relative_capped - relative) > _EPS * max(1.0, 1.0 / t))
                                or np.any(np.abs(v_accel - v_limited) > _EPS))
    if not (velocity_clamped or acceleration_clamped):
        position = goal.copy()  # exact: no rounding drift while tracking within limits
    else:
        # a measured position already beyond a limit is walked back at the limited speed, never
        # snapped onto the limit in one period (that step would exceed vmax) nor moved further out
        position = np.clip(previous + v_accel * t, np.minimum(lo, previous), np.maximum(hi, previous))
    velocity = (position - previous) / t
    return LimitResult(position, velocity, position_clamped, velocity_clamped, acceleration_clamped)


def distance_outside_box(point: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Euclidean distance [m] from a point to an axis-aligned box (0 inside)."""
    below = np.maximum(lower - point, 0.0)
    above = np.maximum(point - upper, 0.0)
    return float(np.linalg.norm(below + above))
