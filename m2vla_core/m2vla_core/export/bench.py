"""Benchmark hook: time one head step (batch 1) in torch eager and onnxruntime.

Not a test: call ``benchmark_head`` from ``m2vla bench`` or by hand; numbers depend on the
machine and its load.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from m2vla_core.features import FeatureContract
from m2vla_core.heads.checkpoint import load_head
from m2vla_core.heads.configuration_head import HeadConfig
from m2vla_core.heads.factory import DEFAULT_PRESET, get_preset
from m2vla_core.heads.policy_head import PolicyHead


def tiny_head(preset: str = DEFAULT_PRESET, *, memory_entries: int = 2048, seed: int = 0) -> PolicyHead:
    """A realistic tiny head: tiny Qwen2-VL width 128, layers (2, 4, 6), 16 + 16 tokens,
    Panda joints 7 + gripper, H = 16; random weights, identity-ish stats, a full random memory."""
    torch.manual_seed(seed)
    contract = FeatureContract(layers=(2, 4, 6), num_image_tokens=16, num_text_tokens=16, width=128)
    config = HeadConfig(contract=contract, state_dim=8, action_space="joint", action_dim=8, chunk_len=16, dt_s=0.1,
                        backbone_id="tiny-qwen2vl", backbone_digest="0" * 64, arch=get_preset(preset))
    head = PolicyHead(config).eval()
    head.normalizer.set_stats(np.zeros(8), np.ones(8), np.zeros(8), np.ones(8))
    if head.uses_memory:
        m = min(memory_entries, config.arch.msm.memory_size)
        head.action_head.memory.set(torch.randn(m, contract.width + 8), torch.randn(m, 16, 8), torch.arange(m))
    return head


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    us = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)), "mean_us": float(us.mean())}


def benchmark_head(checkpoint: str | os.PathLike | PolicyHead | None = None, *, iters: int = 2000, warmup: int = 200,
                   threads: int = 1) -> dict:
    """Head step latency, batch 1: {"torch": {p50_us, p99_us, mean_us}, "onnxruntime": {...},
    "trainable_params": int, "max_abs_error": float}. ``checkpoint`` None -> ``tiny_head()``."""
    from m2vla_core.export.onnx_export import example_inputs, export_onnx
    from m2vla_core.export.runtime import OnnxHeadRuntime, TorchHeadRuntime

    if checkpoint is None:
        head = tiny_head()
    elif isinstance(checkpoint, PolicyHead):
        head = checkpoint
    else:
        head = load_head(checkpoint)
    head = head.cpu().eval()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        features, mask, state = (t.numpy() for t in example_inputs(head, 1))
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(head, Path(tmp) / "head.onnx")
            runtimes = {"torch": TorchHeadRuntime(head), "onnxruntime": OnnxHeadRuntime(exported.path, threads=threads)}
            result: dict = {"trainable_params": head.num_trainable_parameters(), "max_abs_error": exported.max_abs_error,
                            "threads": threads, "iters": iters}
            for name, runtime in runtimes.items():
                for _ in range(warmup):
                    runtime.infer(features, mask, state)
                samples = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    runtime.infer(features, mask, state)
                    samples.append(time.perf_counter() - t0)
                result[name] = _percentiles(samples)
    finally:
        torch.set_num_threads(prev_threads)
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(benchmark_head(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
