"""``ChunkStreamer``: action chunks + measured joint state -> one joint command per period.

The controller owns execution (the policy only predicts): it keeps the chunk in flight,
evaluates it at "now" on a monotonic clock, blends a new chunk in without a position jump,
enforces limits and a workspace box, and holds whenever it cannot trust its inputs.

Blending. A new chunk is indexed by the time since *its* observation (waypoints already due
are skipped, so latency is paid in consumed actions, never guessed). From its acceptance at
t_a the target is the cross-fade ``(1 - w) * old(t) + w * new(t)``, w = smoothstep((t - t_a) /
blend_s), where ``old`` is what the stream was following: the chunk in flight (itself maybe
still fading in), or the held position when holding. At t_a the target and its velocity equal
the old ones, so neither position nor velocity jumps at the seam; the only extra speed is
the smoothstep's slope times the disagreement between the chunks.

Ensembling (``ensemble_chunks`` N > 1). What the stream follows is the mean of the newest N
accepted chunks that still cover now (``ChunkEnsemble``); a new chunk joins it through the same
cross-fade, so adding a member never jumps the target.

Holding. The held position is the last command, or the measured position when nothing was
commanded yet (e.g. after start or ``reset``). Holds on: e-stop (latched until released),
no/stale joint state, no chunk, no chunk accepted for ``chunk_timeout_s``, non-finite output,
``stop``/``reset``. After a hold that dropped the chunk, only chunks computed from an
observation taken after it are accepted.

Following-error fault (``max_following_error`` > 0). When the measured position stays further
than that from the command on a checked joint for ``following_error_time_s``, the arm is not
doing what it is told (blocked, collided, brakes on, a driver that dropped commands): the
stream drops its chunks, holds the *measured* position (so it stops pushing against whatever
holds the arm; the command steps there at once, not through the limiter, as ros2_control's
trajectory controller does on a tolerance violation) and refuses chunks until ``reset``.
Checked on every period with a fresh joint state, tracking or holding; the error must last its
full time after any period that was not checked (e-stop, stale joint state). After ``reset``
the hold anchors on the first joint state that arrived after it, so a reset that overtakes the
arm's new state (a simulator that just moved the arm home) does not hold the old pose.

Plain Python and numpy; time is passed in (``now_s``) so tests drive it without sleeping.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from m2vla_core.control.config import ControllerConfig
from m2vla_core.control.limits import distance_outside_box, limit_step
from m2vla_core.control.trajectory import ChunkEnsemble, ChunkTrajectory, smoothstep
from m2vla_core.control.validation import (
    ESTOP, FOLLOWING_ERROR, STALE_STAMP, Chunk, check_chunk_order, check_chunk_timing, check_chunk_values,
    check_joint_positions, reason_code,
)

# Controller states (same meaning as m2vla_msgs/ControllerStatus STATE_*).
HOLDING = "holding"
TRACKING = "tracking"
ESTOPPED = "estop"

# Hold reasons.
HOLD_ESTOP = "estop"
HOLD_NO_JOINT_STATE = "no_joint_state"
HOLD_STALE_JOINT_STATE = "stale_joint_state"
HOLD_NO_CHUNK = "no_chunk"
HOLD_STALE_CHUNK = "stale_chunk"
HOLD_CHUNK_FINISHED = "chunk_finished"
HOLD_NON_FINITE = "non_finite"
HOLD_STOPPED = "stopped"
HOLD_RESET = "reset"
HOLD_FOLLOWING_ERROR = FOLLOWING_ERROR  # latched until reset

ForwardKinematics = Callable[[np.ndarray], np.ndarray]  # (A,) joint positions -> (3,) end effector [m]
MAX_BLEND_DEPTH = 4  # chunks arriving faster than blend_s nest cross-fades; deeper ones are cut


class _Hold:
    """A constant target (the held position) as a trajectory."""

    def __init__(self, position: np.ndarray) -> None:
        self.position = position.copy()

    def at(self, _t_s: float) -> np.ndarray:
        return self.position.copy()


class _Blend:
    """Cross-fade from ``old`` to ``new`` over [start_s, start_s + blend_s] (smoothstep weight)."""

    def __init__(self, old, new, start_s: float, blend_s: float) -> None:
        if isinstance(old, _Blend) and old.depth >= MAX_BLEND_DEPTH:
            old = old.new  # cut the oldest fades (the limiter bounds the resulting step)
        self.old, self.new, self.start_s, self.blend_s = old, new, float(start_s), float(blend_s)
        self.depth = 1 + (old.depth if isinstance(old, _Blend) else 0)

    def done(self, t_s: float) -> bool:
        return t_s >= self.start_s + self.blend_s

    def at(self, t_s: float) -> np.ndarray:
        w = smoothstep((t_s - self.start_s) / self.blend_s)
        if w >= 1.0:
            return self.new.at(t_s)
        return (1.0 - w) * self.old.at(t_s) + w * self.new.at(t_s)


@dataclass(frozen=True)
class Command:
    """What to send for one period. ``position`` is None only when nothing can be commanded
    (no joint state was ever received and nothing was commanded)."""

    position: np.ndarray | None  # (A,)
    velocity: np.ndarray | None  # (A,)
    state: str  # HOLDING | TRACKING | ESTOPPED
    hold_reason: str  # "" while tracking
    clamped: bool  # a limit or the workspace box changed this command
    time_s: float


class ChunkStreamer:
    def __init__(self, config: ControllerConfig, forward_kinematics: ForwardKinematics | None = None) -> None:
        self.config = config
        self.fk = forward_kinematics if config.workspace is not None else None
        self._box_lo = np.asarray(config.workspace.lower_m) if config.workspace else None
        self._box_hi = np.asarray(config.workspace.upper_m) if config.workspace else None
        self.stats: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()  # by reason code
        self.last_rejection = ""
        self._measured: np.ndarray | None = None
        self._measured_s = -np.inf
        self._commanded: np.ndarray | None = None
        self._velocity = np.zeros(len(config.joint_names))
        self._previous_target: np.ndarray | None = None
        self._trajectory: ChunkTrajectory | None = None  # the newest accepted chunk
        self._members: deque[ChunkTrajectory] = deque(maxlen=config.ensemble_chunks)  # newest last
        self._instruction_id: int | None = None  # of the chunks in _members
        self._source = None  # what the target follows: the chunk, or a _Blend into it
        self._accepted_s = -np.inf
        self._last_sequence_id: int | None = None
        self._last_observation_s: float | None = None
        self._not_before_s: float | None = None
        self._estop = False
        self._idle_reason = HOLD_NO_CHUNK  # why we hold when no chunk is in flight
        self._held = True  # the last command was a hold: tracking resumes with a fresh cross-fade
        self._checked = np.asarray(config.following_error_checked, dtype=bool)  # (A,)
        self._reset_s = -np.inf  # a hold anchors on a joint state that arrived at or after this
        self._over_since_s: float | None = None  # since when the following error exceeds the limit
        self.fault = ""  # the latched following-error fault, "" when none
        self.following_error_peak = 0.0  # largest checked |command - measured| since reset or the caller cleared it

    # ------------------------------------------------------------------------------ inputs
    @property
    def estop(self) -> bool:
        return self._estop

    @property
    def measured(self) -> np.ndarray | None:
        return None if self._measured is None else self._measured.copy()

    def update_joint_state(self, positions, now_s: float) -> str | None:
        """Store a measured joint state (controller order); returns a rejection reason or None."""
        reason = check_joint_positions(positions, self.config)
        if reason is not None:
            self._reject("joint_state", reason)
            return reason
        self._measured = np.asarray(positions, dtype=np.float64).copy()
        self._measured_s = float(now_s)
        self.stats["joint_states"] += 1
        return None

    def offer_chunk(self, chunk: Chunk, now_s: float) -> str | None:
        """Validate and start blending in a chunk; returns a rejection reason or None."""
        reason = None
        if self._estop:
            reason = f"{ESTOP}: chunks are refused while the e-stop is latched"
        elif self.fault:
            reason = f"{FOLLOWING_ERROR}: chunks are refused until reset ({self.fault})"
        elif self._measured is None:
            reason = f"{HOLD_NO_JOINT_STATE}: chunks are refused before the first joint state"
        reason = reason or check_chunk_values(chunk.values, chunk.dt_s, self.config)
        reason = reason or check_chunk_timing(chunk.observation_s, now_s, self.config)
        reason = reason or check_chunk_order(int(chunk.sequence_id), chunk.observation_s,
                                             last_sequence_id=self._last_sequence_id,
                                             last_observation_s=self._last_observation_s,
                                             not_before_s=self._not_before_s)
        if reason is not None:
            self._reject("chunk", reason)
            return reason
        new = ChunkTrajectory(chunk.values, chunk.dt_s, chunk.observation_s, self.config.interpolation)
        if new.end_s <= now_s:
            reason = f"{STALE_STAMP}: every waypoint of the chunk is already due"
            self._reject("chunk", reason)
            return reason
        if self._source is not None and not self._held:
            old = self._source  # fade out of the chunk (or fade) in flight
        else:
            start = self._current_position()
            old = None if start is None else _Hold(start)  # fade out of the held position
        if int(chunk.instruction_id) != self._instruction_id:
            self._members.clear()  # the old instruction's plans leave the mean at once (the cross-fade stays)
            self._instruction_id = int(chunk.instruction_id)
        self._trajectory = new
        self._members.append(new)
        follow = self._follow()
        self._source = follow if old is None or self.config.blend_s <= 0 else _Blend(old, follow, now_s,
                                                                                     self.config.blend_s)
        self._accepted_s = float(now_s)
        self._last_sequence_id = int(chunk.sequence_id)
        self._last_observation_s = float(chunk.observation_s)
        self.stats["chunks_accepted"] += 1
        self.stats["waypoints_skipped"] += int(new.index_at(now_s))
        return None

    def set_estop(self, engaged: bool, now_s: float) -> None:
        """Latch (True) or release (False) the e-stop. Engaging drops the chunk in flight."""
        engaged = bool(engaged)
        if engaged and not self._estop:
            self._drop(now_s, HOLD_NO_CHUNK)
            self.stats["estops"] += 1
        self._estop = engaged

    def stop(self, now_s: float) -> None:
        """Drop the chunk in flight and hold at the last command until a newer chunk."""
        self._drop(now_s, HOLD_STOPPED)

    def reset(self, now_s: float) -> None:
        """Drop everything, clear a following-error fault; hold at the measured state (not a stale
        command); sequence ids start over."""
        self._drop(now_s, HOLD_RESET)
        self.fault, self._over_since_s, self.following_error_peak = "", None, 0.0
        self._reset_s = float(now_s)
        self._commanded = None
        self._velocity[:] = 0.0
        self._last_sequence_id = None
        self._last_observation_s = None

    # ------------------------------------------------------------------------------ output
    def step(self, now_s: float) -> Command:
        """The command for ``now_s``; call once per command period."""
        cfg = self.config
        if self._estop:
            return self._unchecked_hold(now_s, HOLD_ESTOP, ESTOPPED)
        if self._measured is None:
            return self._unchecked_hold(now_s, HOLD_NO_JOINT_STATE)
        if now_s - self._measured_s > cfg.max_joint_state_age_s:
            return self._unchecked_hold(now_s, HOLD_STALE_JOINT_STATE)
        if self.fault:
            return self._hold(now_s, HOLD_FOLLOWING_ERROR)
        if self._following_error_persists(now_s):
            return self._latch_following_error(now_s)
        if self._trajectory is None:
            return self._hold(now_s, self._idle_reason)
        if now_s - self._accepted_s > cfg.chunk_timeout_s:
            self._drop(now_s, HOLD_STALE_CHUNK, forbid_older=False)
            self.stats["stale_chunk_holds"] += 1
            return self._hold(now_s, HOLD_STALE_CHUNK)
        if self._held and self._commanded is not None:
            # resuming after a hold with the chunk still in flight (e.g. joint states came back):
            # cross-fade again from the held position instead of chasing the chunk at full speed
            self._source = self._follow() if self.config.blend_s <= 0 else _Blend(
                _Hold(self._commanded), self._follow(), now_s, self.config.blend_s)
        self._held = False
        target = self._target(now_s)
        if not np.isfinite(target).all():
            self._drop(now_s, HOLD_NON_FINITE)
            return self._hold(now_s, HOLD_NON_FINITE)
        previous = self._commanded if self._commanded is not None else self._measured
        result = limit_step(target, self._previous_target, previous, self._velocity, cfg.period_s, cfg.limits)
        position, velocity, clamped = result.position, result.velocity, result.clamped
        for kind in ("position", "velocity", "acceleration"):
            if getattr(result, f"{kind}_clamped"):
                self.stats[f"{kind}_clamps"] += 1
        if self.fk is not None and self._leaves_workspace(previous, position):
            position, velocity, clamped = previous.copy(), np.zeros_like(previous), True
            self.stats["workspace_clamps"] += 1
        if not np.isfinite(position).all():  # cannot happen with finite inputs; never send it anyway
            self._drop(now_s, HOLD_NON_FINITE)
            return self._hold(now_s, HOLD_NON_FINITE)
        self._previous_target = target
        self._commanded, self._velocity = position, velocity
        if clamped:
            self.stats["limit_clamps"] += 1
        self.stats["commands"] += 1
        finished = now_s >= self._trajectory.end_s
        return Command(position.copy(), velocity.copy(), HOLDING if finished else TRACKING,
                       HOLD_CHUNK_FINISHED if finished else "", clamped, now_s)

    # ------------------------------------------------------------------------------ internals
    def _following_error_persists(self, now_s: float) -> bool:
        """Whether the last command and the (fresh) measured state have been further apart than
        ``max_following_error`` on a checked joint for ``following_error_time_s``."""
        if self._commanded is None or not self._checked.any():
            self._over_since_s = None
            return False
        worst = float(np.abs(self._commanded - self._measured)[self._checked].max())
        self.following_error_peak = max(self.following_error_peak, worst)
        if worst <= self.config.max_following_error:
            self._over_since_s = None
            return False
        if self._over_since_s is None:
            self._over_since_s = float(now_s)
        return now_s - self._over_since_s >= self.config.following_error_time_s

    def _latch_following_error(self, now_s: float) -> Command:
        error = np.where(self._checked, np.abs(self._commanded - self._measured), -np.inf)
        joint = int(np.argmax(error))
        self.fault = (f"{self.config.joint_names[joint]} {error[joint]:.3f} from its command for "
                      f"{now_s - self._over_since_s:.2f} s (limit {self.config.max_following_error:g})")
        self._drop(now_s, HOLD_FOLLOWING_ERROR)
        self._commanded = self._measured.copy()  # stop where the arm is, not where it was told to go
        self.stats["following_error_faults"] += 1
        return self._hold(now_s, HOLD_FOLLOWING_ERROR)

    def _target(self, now_s: float) -> np.ndarray:
        while isinstance(self._source, _Blend) and self._source.done(now_s):
            self._source = self._source.new  # finished fades collapse into their chunk
        return self._source.at(now_s)  # (A,)

    def _follow(self):
        """What tracking follows: the newest chunk, or the ensemble of the newest ones."""
        return self._trajectory if len(self._members) <= 1 else ChunkEnsemble(self._members,
                                                                              self.config.ensemble_decay)

    def _current_position(self) -> np.ndarray | None:
        """Where the stream is: the last command sent, else the measured position."""
        if self._commanded is not None:
            return self._commanded.copy()
        return None if self._measured is None else self._measured.copy()

    def _leaves_workspace(self, previous: np.ndarray, position: np.ndarray) -> bool:
        """True when ``position`` puts the end effector outside the box, further out than ``previous``."""
        try:
            new = distance_outside_box(np.asarray(self.fk(position), dtype=np.float64), self._box_lo, self._box_hi)
            if new <= 0.0:
                return False
            old = distance_outside_box(np.asarray(self.fk(previous), dtype=np.float64), self._box_lo, self._box_hi)
        except (ValueError, ArithmeticError):
            return True  # forward kinematics refused the pose: do not move there
        return not (new < old)  # moving back toward the box is allowed

    def _drop(self, now_s: float, reason: str, *, forbid_older: bool = True) -> None:
        self._trajectory = None
        self._members.clear()
        self._source = None
        self._previous_target = None
        self._idle_reason = reason
        if forbid_older:
            self._not_before_s = float(now_s)

    def _unchecked_hold(self, now_s: float, reason: str, state: str = HOLDING) -> Command:
        """A hold in which the following error cannot be judged (no fresh joint state, or an
        e-stop): the error must last its full time once it is checked again."""
        self._over_since_s = None
        return self._hold(now_s, reason, state)

    def _hold(self, now_s: float, reason: str, state: str = HOLDING) -> Command:
        position = self._commanded if self._commanded is not None else self._measured
        self._velocity[:] = 0.0
        self._previous_target = None
        self._held = True
        if position is None:
            return Command(None, None, state, reason, False, now_s)
        if self._commanded is not None or self._measured_s >= self._reset_s:
            self._commanded = position.copy()
        # else: the joint state predates the reset (e.g. the sim just moved the arm home and its new
        # state is on the way): hold what is measured, anchor on the first state from after the reset
        self.stats["commands"] += 1
        self.stats[f"hold_{reason}"] += 1
        return Command(position.copy(), np.zeros_like(position), state, reason, False, now_s)

    def reject(self, what: str, reason: str) -> None:
        """Count a rejection decided outside (e.g. a message that did not convert)."""
        self._reject(what, reason)

    def _reject(self, what: str, reason: str) -> None:
        self.rejections[f"{what}:{reason_code(reason)}"] += 1
        self.stats[f"{what}s_rejected"] += 1
        self.last_rejection = f"{what} {reason}"
