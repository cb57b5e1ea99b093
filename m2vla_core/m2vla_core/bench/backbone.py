"""Per-frame feature extraction on the tiny backbone, with and without each optimisation.

Every timed frame is a new image with the same instruction (perception's steady state), and
the four variants of ``backbone.microbench.VARIANTS`` run interleaved frame by frame. Two
contracts: the policy's own and a shallow one (layers 1-3), because stop-at-deepest can only
save layers the head does not read.
"""

from __future__ import annotations

import numpy as np

from m2vla_core.backbone.microbench import VARIANTS
from m2vla_core.bench.settings import INSTRUCTION, BenchSettings
from m2vla_core.bench.timing import interleaved, ratio, summarize
from m2vla_core.features import FeatureContract

TARGET_FRAME_MS = 30.0  # DESIGN.md: perception per new frame <= 30 ms
TARGET_CACHE_HIT_MS = 1.0  # DESIGN.md: cache hit <= 1 ms


def load_backbone(threads: int = 1):
    import torch

    from m2vla_core.backbone import FrozenBackbone, default_backbone_path

    torch.set_num_threads(threads)
    return FrozenBackbone.from_pretrained(default_backbone_path())


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def time_contract(bb, contract: FeatureContract, settings: BenchSettings) -> dict:
    images = frames(settings.backbone_frames + settings.backbone_warmup)

    def variant(stop: bool, reuse: bool):
        return lambda i: bb.extract(images[i], INSTRUCTION, contract, stop_at_deepest=stop, reuse_instruction=reuse)

    samples = interleaved({name: variant(*flags) for name, flags in VARIANTS.items()}, settings.backbone_frames,
                          settings.backbone_warmup)
    out: dict = {"layers": list(contract.layers), "layers_run_with_stop_count": contract.deepest_layer,
                 "layers_total_count": bb.num_layers}
    for name in VARIANTS:
        out.update(summarize(samples[name], "ms", f"{name}_"))
    base = out["baseline_p50_ms"]
    out["speedup_stop_at_deepest"] = ratio(base, out["stop_at_deepest_p50_ms"])
    out["speedup_reuse_instruction"] = ratio(base, out["reuse_instruction_p50_ms"])
    out["speedup_both"] = ratio(base, out["both_p50_ms"])
    return out


def time_cache_hit(bb, contract: FeatureContract, settings: BenchSettings) -> dict:
    """A repeated (frame, instruction) through PerceptionEngine: a lookup, not a forward pass."""
    import time

    from m2vla_core.perception import PerceptionConfig, PerceptionEngine

    engine = PerceptionEngine(PerceptionConfig())
    engine.load()
    image = frames(1, seed=1)[0]
    engine.extract(image, INSTRUCTION, contract)
    samples = []
    for _ in range(settings.cache_hit_iters):
        t0 = time.perf_counter()
        _, compute_ms = engine.extract(image, INSTRUCTION, contract)
        samples.append(time.perf_counter() - t0)
    return {**summarize(samples, "us", "cache_hit_"), "cache_hit_forward_passes_count": int(compute_ms > 0)}


def run(settings: BenchSettings, contract: FeatureContract) -> dict:
    bb = load_backbone(settings.threads)
    shallow = FeatureContract(layers=(1, 2, 3), num_image_tokens=contract.num_image_tokens,
                              num_text_tokens=contract.num_text_tokens, width=contract.width)
    policy = time_contract(bb, contract, settings)
    out = {
        "backbone": bb.backbone_id,
        "frozen_params_count": sum(p.numel() for p in bb.model.parameters()),  # never trained
        "trainable_params_count": sum(p.numel() for p in bb.model.parameters() if p.requires_grad),  # 0
        "image_tokens_native_count": bb.num_image_tokens_native,
        "instruction_tokens_count": len(bb.tokenizer(INSTRUCTION)["input_ids"]),
        "frames_count": settings.backbone_frames,
        "policy_contract": policy,
        "shallow_contract": time_contract(bb, shallow, settings),
        **time_cache_hit(bb, contract, settings),
        "target_frame_ms": TARGET_FRAME_MS,
        "target_cache_hit_us": TARGET_CACHE_HIT_MS * 1e3,
    }
    out["target_met"] = bool(policy["both_p50_ms"] <= TARGET_FRAME_MS and out["cache_hit_p99_us"] <= TARGET_CACHE_HIT_MS * 1e3)
    return out
