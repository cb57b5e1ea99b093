"""Command-stream timing: measured rate, period error percentiles, ticks on time; whether a
policy's cadence leaves each chunk enough waypoints to cover the time until the next arrives."""

from __future__ import annotations

import numpy as np


# [s] observation -> chunk at the controller budgeted for the graph: instruction -> first command
# measured p50 141-177 ms through `m2vla demo` (docs/results.md), with headroom for a busy machine
GRAPH_LATENCY_BUDGET_S = 0.3


def chunk_hold_s(chunk_span_s: float, period_s: float, latency_s: float = GRAPH_LATENCY_BUDGET_S) -> float:
    """How long the arm holds at the end of every chunk before the next one arrives (0: never).

    A chunk covers ``chunk_span_s`` from its observation; the next one is observed a policy period
    later and arrives ``latency_s`` after that. Holding at each chunk's end (the controller's
    ``chunk_finished``) makes the motion stop-and-go.
    """
    return max(0.0, float(period_s) + float(latency_s) - float(chunk_span_s))


def rate_without_holds_hz(chunk_span_s: float, latency_s: float = GRAPH_LATENCY_BUDGET_S) -> float | None:
    """The policy rate above which ``chunk_hold_s`` is 0; None when no rate is enough (chunk <= latency)."""
    margin_s = float(chunk_span_s) - float(latency_s)
    return 1.0 / margin_s if margin_s > 0.0 else None


class PeriodMonitor:
    """Collects tick times (monotonic s) over a window; ``summary()`` reports and starts a new window."""

    def __init__(self, nominal_period_s: float, on_time_tolerance_s: float = 1e-3, max_ticks: int = 100_000) -> None:
        self.nominal_period_s = float(nominal_period_s)
        self.tolerance_s = float(on_time_tolerance_s)
        self._max = int(max_ticks)
        self._ticks: list[float] = []
        self._last: float | None = None

    def tick(self, now_s: float) -> None:
        if len(self._ticks) < self._max:
            self._ticks.append(now_s)

    def summary(self) -> dict[str, float]:
        ticks = np.asarray(self._ticks, dtype=np.float64)
        if self._last is not None:
            ticks = np.concatenate([[self._last], ticks])
        self._last = float(ticks[-1]) if ticks.size else self._last
        self._ticks = []
        if ticks.size < 2:
            return {"rate_hz": 0.0, "period_error_p99_ms": 0.0, "on_time_fraction": 0.0, "ticks": float(max(0, ticks.size - 1))}
        periods = np.diff(ticks)  # (N-1,)
        errors = np.abs(periods - self.nominal_period_s)
        return {
            "rate_hz": float(periods.size / (ticks[-1] - ticks[0])) if ticks[-1] > ticks[0] else 0.0,
            "period_error_p99_ms": float(np.percentile(errors, 99) * 1e3),
            "on_time_fraction": float(np.mean(errors <= self.tolerance_s)),
            "ticks": float(periods.size),
        }


class TickGrid:
    """The command loop's clock: tick times on a fixed grid, whatever the wake-up jitter.

    The limiter estimates the target's velocity assuming one period per step. Sampling the
    chunk at the actual wake-up time instead (late, then on time) makes the target seem to speed
    up and slow down: in a streamer driven at wake-up times with every other one 1.4 periods
    late, the start of a ramp stepped back by 4e-5 rad. A loop more than a period behind
    restarts the grid at the wake-up time: one step, never a burst. Holds (stale joint state,
    chunk timeout) are decided on the grid time too, so at most one period late.
    """

    def __init__(self, period_s: float, start_s: float) -> None:
        if not period_s > 0:
            raise ValueError(f"TickGrid.period_s must be > 0, got {period_s}")
        self.period_s = float(period_s)
        self.next_s = float(start_s)  # when the next tick is due

    def tick(self, now_s: float) -> float:
        """Time to step the streamer at, for a wake-up at ``now_s`` (monotonic, increasing)."""
        if now_s - self.next_s > self.period_s:
            self.next_s = float(now_s)
        tick_s = self.next_s
        self.next_s += self.period_s
        return tick_s
