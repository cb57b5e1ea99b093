"""Head step (features cached -> chunk), batch 1: torch eager vs onnxruntime, interleaved."""

from __future__ import annotations

from m2vla_core.bench.heads import OrtHead, policy_head
from m2vla_core.bench.settings import BenchSettings
from m2vla_core.bench.timing import interleaved, ratio, summarize

TARGET_P99_US = 2000.0  # DESIGN.md: policy step, onnxruntime, p99 <= 2 ms


def run(settings: BenchSettings) -> dict:
    head, description = policy_head()
    runner = OrtHead(head, threads=settings.threads)
    samples = interleaved({"torch": runner.step_torch, "onnxruntime": runner.step_ort},
                          settings.head_iters, settings.head_warmup)
    torch_s, ort_s = summarize(samples["torch"], "us", "torch_"), summarize(samples["onnxruntime"], "us", "onnxruntime_")
    cfg = head.config
    return {
        "policy": description,
        "contract_layers": list(cfg.contract.layers),
        "chunk_len_count": cfg.chunk_len,
        "action_dim_count": cfg.action_dim,
        "trainable_params_count": head.num_trainable_parameters(),
        "onnx_parity_max_abs_error_rad": runner.max_abs_error,
        "iters_count": settings.head_iters,
        **torch_s, **ort_s,
        "speedup_onnxruntime_vs_torch": ratio(torch_s["torch_p50_us"], ort_s["onnxruntime_p50_us"]),
        "target_onnxruntime_p99_us": TARGET_P99_US,
        "target_met": ort_s["onnxruntime_p99_us"] <= TARGET_P99_US,
        "_samples_us": {k: [s * 1e6 for s in v] for k, v in samples.items()},  # for the plots, not the JSON
    }
