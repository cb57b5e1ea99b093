"""Continuous-time evaluation of a chunk: waypoints -> position at any time.

Waypoint ``i`` is due at ``t0 + (i + 1) * dt``, so the segment before waypoint 0 starts at the
observation time t0, where the arm is estimated one step back along the first segment
(``2 p0 - p1``): the chunk's own velocity holds from t0 on, with no flat start that would make
every new chunk brake and re-accelerate. After the last waypoint it stays there (never
extrapolates forward), and before t0 it stays at the estimate.
"""

from __future__ import annotations

import math

import numpy as np


class ChunkTrajectory:
    def __init__(self, values: np.ndarray, dt_s: float, t0_s: float, interpolation: str = "cubic") -> None:
        self.values = np.asarray(values, dtype=np.float64)  # (H, A)
        self.dt_s = float(dt_s)
        self.t0_s = float(t0_s)
        self.cubic = interpolation == "cubic" and self.values.shape[0] >= 3
        if self.cubic:
            # Catmull-Rom tangents per waypoint index (one-sided at the ends): C1, passes through waypoints.
            p = self.values
            m = np.empty_like(p)  # (H, A) [units per waypoint]
            m[1:-1] = 0.5 * (p[2:] - p[:-2])
            m[0] = p[1] - p[0]
            m[-1] = p[-1] - p[-2]
            self._tangents = m

    @property
    def horizon(self) -> int:
        return int(self.values.shape[0])

    @property
    def end_s(self) -> float:
        """Time the last waypoint is due."""
        return self.t0_s + self.horizon * self.dt_s

    def index_at(self, t_s: float) -> float:
        """Fractional waypoint index due at ``t_s`` (0 = first waypoint), clamped to [0, H-1]."""
        s = (t_s - self.t0_s) / self.dt_s - 1.0
        return min(max(s, 0.0), float(self.horizon - 1))

    def at(self, t_s: float) -> np.ndarray:
        if self.horizon == 1:
            return self.values[0].copy()
        s = (t_s - self.t0_s) / self.dt_s - 1.0
        if s < 0.0:  # between the observation and waypoint 0: along the first segment, backwards
            back = min(-s, 1.0)
            return self.values[0] + back * (self.values[0] - self.values[1])
        s = min(s, float(self.horizon - 1))
        i = min(int(math.floor(s)), self.horizon - 2)
        u = s - i
        p0, p1 = self.values[i], self.values[i + 1]
        if not self.cubic:
            return (1.0 - u) * p0 + u * p1
        m0, m1 = self._tangents[i], self._tangents[i + 1]
        u2, u3 = u * u, u * u * u
        return ((2 * u3 - 3 * u2 + 1) * p0 + (u3 - 2 * u2 + u) * m0
                + (-2 * u3 + 3 * u2) * p1 + (u3 - u2) * m1)


class ChunkEnsemble:
    """Temporal ensembling: the weighted mean of the chunks (oldest first) that still cover ``t``.

    Each chunk is a plan from its own observation; asked every few waypoints, the head can switch
    between plans mid-motion. Averaging every recent plan's waypoint for the same instant (as in
    ACT) keeps what they agree on: on the shipped head, re-planned every 4 waypoints and averaged
    over the newest 4 chunks, 77.9 % of 240 held-out episodes against 73.3 % following each chunk
    for 12 (docs/results.md, "Averaging overlapping chunks"). Weights are exp(-decay * i), i = 0
    for the oldest chunk covering t (ACT's choice: the older plans steady the newer ones; decay
    0.7 took the shipped head from 81.1 to 82.8 % of 360 episodes, "Weighing the older plans
    more"); 0 = equal weights. A chunk covers t up to its last waypoint's time; when none does, the newest
    holds its last waypoint.
    """

    def __init__(self, members, decay: float = 0.0) -> None:
        if not members:
            raise ValueError("ChunkEnsemble needs at least one chunk")
        self.members = tuple(members)
        self.decay = float(decay)

    def at(self, t_s: float) -> np.ndarray:
        live = [m for m in self.members if t_s <= m.end_s]
        if not live:
            return self.members[-1].at(t_s)
        weights = np.exp(-self.decay * np.arange(len(live)))  # (N,), oldest first
        return np.average([m.at(t_s) for m in live], axis=0, weights=weights)


def smoothstep(x: float) -> float:
    """0 -> 0, 1 -> 1 with zero slope at both ends (cross-fade weight)."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)
