"""Per-frame extraction time with and without each optimisation (a measurement, not a test).

``python -m m2vla_core.backbone.microbench [--backbone DIR_OR_ID] [--layers 1,3] [--frames 60]``

Every timed frame is a new image, so only the instruction prefix can be reused; this is the
perception node's steady state (same instruction, new camera frames). The benchmark suite
calls ``time_extract`` / ``compare_optimisations`` directly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from m2vla_core.features import FeatureContract

VARIANTS = {  # name -> (stop_at_deepest, reuse_instruction)
    "baseline": (False, False),
    "stop_at_deepest": (True, False),
    "reuse_instruction": (False, True),
    "both": (True, True),
}


def time_extract(backbone, contract: FeatureContract, instruction: str, *, stop_at_deepest: bool,
                 reuse_instruction: bool, frames: int = 60, warmup: int = 5, seed: int = 0) -> dict[str, float]:
    """Wall time [ms] of ``backbone.extract`` on ``frames`` distinct random 224x224 frames."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(frames + warmup)]
    for image in images[:warmup]:
        backbone.extract(image, instruction, contract, stop_at_deepest=stop_at_deepest, reuse_instruction=reuse_instruction)
    times = []
    for image in images[warmup:]:
        t0 = time.perf_counter()
        backbone.extract(image, instruction, contract, stop_at_deepest=stop_at_deepest, reuse_instruction=reuse_instruction)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "mean_ms": statistics.fmean(times)}


def compare_optimisations(backbone, contract: FeatureContract, instruction: str, **kwargs) -> dict[str, dict[str, float]]:
    return {name: time_extract(backbone, contract, instruction, stop_at_deepest=stop, reuse_instruction=reuse, **kwargs)
            for name, (stop, reuse) in VARIANTS.items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    from m2vla_core.backbone import FrozenBackbone, default_backbone_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="", help="hub id or dir; default: the shipped tiny Qwen2-VL")
    parser.add_argument("--layers", default="", help="comma-separated hidden-state indices; default: several contracts")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--instruction", default="pick up the red cube and place it on the blue tray")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb = FrozenBackbone.from_pretrained(args.backbone or default_backbone_path(), device=args.device)
    layer_sets = ([tuple(int(x) for x in args.layers.split(","))] if args.layers
                  else [(1,), (bb.num_layers // 2,), (bb.num_layers,)])
    print(f"backbone {bb.backbone_id}  layers={bb.num_layers}  width={bb.hidden_size}  "
          f"image tokens={bb.num_image_tokens_native}  torch threads={torch.get_num_threads()}  device={args.device}")
    print(f"instruction: {args.instruction!r} ({len(bb.tokenizer(args.instruction)['input_ids'])} tokens)")
    for layers in layer_sets:
        contract = bb.contract(layers, num_text_tokens=16)
        results = compare_optimisations(bb, contract, args.instruction, frames=args.frames)
        cells = "  ".join(f"{name} {r['p50_ms']:6.2f}" for name, r in results.items())
        print(f"layers {str(list(layers)):<10} p50 ms/frame: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
