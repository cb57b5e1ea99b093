"""Validators for what crosses into the controller: action chunks and measured joint states.

Each check returns ``None`` when the input is acceptable, or a reason string
``"<code>: <detail>"``; the code (before the colon) is what status counters are keyed by, the
detail is what the log line says. They never raise on bad data: a bad message is a counted
rejection, never an exception in the control loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from m2vla_core.control.config import ControllerConfig

# Rejection / hold codes (the part of a reason before the colon).
BAD_SHAPE = "bad_shape"
NON_FINITE = "non_finite"
OUT_OF_LIMITS = "out_of_limits"
TOO_FAST = "too_fast"
BAD_DT = "bad_dt"
STALE_STAMP = "stale_stamp"
FUTURE_STAMP = "future_stamp"
OUT_OF_ORDER = "out_of_order"
PREDATES_HOLD = "predates_hold"
ESTOP = "estop"
FOLLOWING_ERROR = "following_error"


def reason_code(reason: str) -> str:
    """``"code: detail"`` -> ``"code"``."""
    return reason.split(":", 1)[0].strip()


@dataclass(frozen=True)
class Chunk:
    """A joint-space action chunk in the controller's joint order and time base.

    Waypoint ``i`` is due at ``observation_s + (i + 1) * dt_s`` (monotonic seconds): the
    chunk is indexed by the time since the observation it was computed from, so inference
    and transport latency skip the waypoints that are already due.
    """

    values: np.ndarray  # (H, A) float64
    dt_s: float
    observation_s: float  # monotonic time of the observation (camera frame)
    sequence_id: int = 0
    instruction_id: int = 0  # which instruction it serves: the ensemble never averages two instructions' plans

    @property
    def horizon(self) -> int:
        return int(self.values.shape[0])

    @property
    def end_s(self) -> float:
        return self.observation_s + self.horizon * self.dt_s


def _count_bad(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def check_chunk_values(values, dt_s, config: ControllerConfig) -> str | None:
    """Shape (H, A) with A = len(joint_names), finite, inside limits (+ tolerance), plausible speed."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return f"{BAD_SHAPE}: values are not numeric ({exc})"
    n = len(config.joint_names)
    if arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] < 1:
        return f"{BAD_SHAPE}: expected (H >= 1, {n}) waypoints, got shape {arr.shape}"
    if arr.shape[0] > config.max_horizon:
        return f"{BAD_SHAPE}: horizon {arr.shape[0]} exceeds max_horizon {config.max_horizon}"
    try:
        dt = float(dt_s)
    except (TypeError, ValueError):
        return f"{BAD_DT}: dt {dt_s!r} is not a number"
    if not math.isfinite(dt) or not 1e-4 <= dt <= 10.0:
        return f"{BAD_DT}: waypoint spacing dt must be in [1e-4, 10] s, got {dt}"
    bad = _count_bad(arr)
    if bad:
        return f"{NON_FINITE}: {bad} NaN/inf values in the chunk"
    lim = config.limits
    tol = config.position_tolerance
    lower = np.asarray(lim.lower) - tol  # (A,)
    upper = np.asarray(lim.upper) + tol  # (A,)
    outside = (arr < lower) | (arr > upper)  # (H, A)
    if outside.any():
        i, j = (int(x) for x in np.argwhere(outside)[0])
        return (f"{OUT_OF_LIMITS}: {config.joint_names[j]} = {arr[i, j]:.4g} at waypoint {i} is outside "
                f"[{lim.lower[j]:.4g}, {lim.upper[j]:.4g}] (tolerance {tol})")
    if arr.shape[0] > 1:
        speed = np.abs(np.diff(arr, axis=0)) / dt  # (H-1, A)
        cap = config.max_chunk_speed_factor * np.asarray(lim.velocity)  # (A,)
        fast = speed > cap
        if fast.any():
            i, j = (int(x) for x in np.argwhere(fast)[0])
            return (f"{TOO_FAST}: {config.joint_names[j]} moves {speed[i, j]:.3g}/s between waypoints {i} and "
                    f"{i + 1}, above {config.max_chunk_speed_factor} x its velocity limit {lim.velocity[j]}")
    return None


def check_chunk_timing(observation_s: float, now_s: float, config: ControllerConfig) -> str | None:
    """The observation a chunk answers must be recent and not in the future."""
    if not math.isfinite(observation_s):
        return f"{NON_FINITE}: observation time is {observation_s}"
    age = now_s - observation_s
    if age > config.max_chunk_age_s:
        return f"{STALE_STAMP}: observation is {age:.3f} s old (max_chunk_age_s {config.max_chunk_age_s})"
    if -age > config.max_future_stamp_s:
        return f"{FUTURE_STAMP}: observation stamp is {-age:.3f} s in the future (clock skew?)"
    return None


SAME_OBSERVATION_S = 1e-3  # observation times closer than this are the same camera frame


def check_chunk_order(sequence_id: int, observation_s: float, *, last_sequence_id: int | None,
                      last_observation_s: float | None, not_before_s: float | None) -> str | None:
    """Refuse repeated / older chunks and chunks computed before the last e-stop, stop or reset.

    A lower sequence id with a newer observation is accepted: the policy restarted and counts
    from 1 again. "Newer" means by more than ``SAME_OBSERVATION_S``: the controller maps each
    arriving stamp onto its monotonic clock, so one stamp seen twice (a replayed or duplicated
    chunk) lands a few microseconds apart and must still count as the same observation.
    """
    if not all(math.isfinite(v) for v in (observation_s, *(x for x in (last_observation_s, not_before_s)
                                                            if x is not None))):
        return f"{NON_FINITE}: observation time is not finite"
    if not_before_s is not None and observation_s < not_before_s:
        return (f"{PREDATES_HOLD}: observation is {not_before_s - observation_s:.3f} s older than the last "
                f"e-stop/stop/reset")
    if last_sequence_id is None or last_observation_s is None:
        return None
    if observation_s < last_observation_s - SAME_OBSERVATION_S:
        return (f"{OUT_OF_ORDER}: observation is {last_observation_s - observation_s:.3f} s older than the chunk "
                f"in flight (sequence id {sequence_id}, last {last_sequence_id})")
    if sequence_id <= last_sequence_id and observation_s <= last_observation_s + SAME_OBSERVATION_S:
        return f"{OUT_OF_ORDER}: sequence id {sequence_id} <= last accepted {last_sequence_id} for the same observation"
    return None


def check_joint_positions(positions, config: ControllerConfig) -> str | None:
    """A measured joint state must have one finite value per controller joint, inside the joint
    limits (+ ``position_tolerance``, as for chunks). The controller holds at, and starts from, the
    measured state, so a reading no arm can have (a driver's sentinel, a unit mix-up) would become
    a command."""
    try:
        arr = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return f"{BAD_SHAPE}: joint positions are not numeric ({exc})"
    n = len(config.joint_names)
    if arr.shape != (n,):
        return f"{BAD_SHAPE}: expected {n} joint positions, got shape {arr.shape}"
    bad = _count_bad(arr)
    if bad:
        return f"{NON_FINITE}: {bad} NaN/inf joint positions"
    lim, tol = config.limits, config.position_tolerance
    outside = np.flatnonzero((arr < np.asarray(lim.lower) - tol) | (arr > np.asarray(lim.upper) + tol))
    if outside.size:
        j = int(outside[0])
        return (f"{OUT_OF_LIMITS}: measured {config.joint_names[j]} = {arr[j]:.4g} is outside "
                f"[{lim.lower[j]:.4g}, {lim.upper[j]:.4g}] (tolerance {tol})")
    return None
