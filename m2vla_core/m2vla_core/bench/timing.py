"""Percentiles and interleaved timing: comparisons are runs alternated in one process, so load
from other programs on this shared machine hits every variant alike."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

SCALE = {"us": 1e6, "ms": 1e3, "s": 1.0}


def summarize(samples_s, unit: str = "us", prefix: str = "") -> dict[str, float]:
    """{prefix}p50_{unit}, p99_{unit}, mean_{unit} of durations in seconds."""
    x = np.asarray(samples_s, dtype=np.float64) * SCALE[unit]
    if x.size == 0:
        return {f"{prefix}p50_{unit}": float("nan"), f"{prefix}p99_{unit}": float("nan"),
                f"{prefix}mean_{unit}": float("nan")}
    return {f"{prefix}p50_{unit}": float(np.percentile(x, 50)), f"{prefix}p99_{unit}": float(np.percentile(x, 99)),
            f"{prefix}mean_{unit}": float(x.mean())}


def interleaved(variants: dict[str, Callable[[int], object]], iters: int, warmup: int = 0) -> dict[str, list[float]]:
    """Call every variant once per iteration (rotating the order); -> seconds per call per variant.

    Each callable gets the iteration index (negative during warm-up) so it can pick a new input.
    """
    names = list(variants)
    for i in range(warmup):
        for name in names:
            variants[name](-1 - i)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            variants[name](i)
            samples[name].append(time.perf_counter() - t0)
    return samples


def ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")
