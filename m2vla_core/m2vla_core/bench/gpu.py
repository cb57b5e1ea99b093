"""GPU figures (only where CUDA is present): a real-size backbone (Qwen2.5-VL-3B shapes, random
weights, bf16) with the optimisations on / off, and onnxruntime's CUDA head latency."""

from __future__ import annotations

from m2vla_core.bench.settings import INSTRUCTION, BenchSettings
from m2vla_core.bench.timing import interleaved, summarize

QWEN25_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2)
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def skip_reason() -> str:
    """"" when a CUDA device can run this section, else why not."""
    try:
        import torch
    except ImportError as exc:
        return f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device on this machine (torch.cuda.is_available() is False)"
    return ""


def run(settings: BenchSettings) -> dict:
    reason = skip_reason()
    if reason:
        return {"skipped": True, "reason": reason}
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from m2vla_core.backbone import FrozenBackbone, default_backbone_path
    from m2vla_core.bench.heads import OrtHead, make_head

    tiny = FrozenBackbone.from_pretrained(default_backbone_path())  # tokenizer + processor + special ids
    text = tiny.model.config.text_config.to_dict() | QWEN25_VL_3B_TEXT
    tiny_cfg = tiny.model.config
    config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_3B_VISION, image_token_id=tiny_cfg.image_token_id,
                              video_token_id=tiny_cfg.video_token_id, vision_start_token_id=tiny_cfg.vision_start_token_id,
                              vision_end_token_id=tiny_cfg.vision_end_token_id)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    bb = FrozenBackbone(model, tiny.tokenizer, tiny.image_processor, model_type="qwen2_5_vl",
                        backbone_id="qwen2_5_vl:3B-shape-random", weights_digest="0" * 64, image_size=224)
    contract = bb.contract((9, 18, 27), num_image_tokens=16, num_text_tokens=16)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(settings.backbone_frames + 3)]

    def variant(stop: bool, reuse: bool):
        def call(i: int):
            bb.extract(images[i], INSTRUCTION, contract, stop_at_deepest=stop, reuse_instruction=reuse)
            torch.cuda.synchronize()
        return call

    samples = interleaved({"baseline": variant(False, False), "both": variant(True, True)},
                          settings.backbone_frames, warmup=3)
    out: dict = {"skipped": False, "device": torch.cuda.get_device_name(0), "backbone": "Qwen2.5-VL-3B shape, random, bf16",
                 "contract_layers": list(contract.layers),
                 **summarize(samples["baseline"], "ms", "backbone_baseline_"), **summarize(samples["both"], "ms", "backbone_both_")}
    out["speedup_both"] = out["backbone_baseline_p50_ms"] / out["backbone_both_p50_ms"]
    try:
        runner = OrtHead(make_head(), device="cuda")
        out.update(summarize(interleaved({"h": runner.step_ort}, settings.head_iters, 50)["h"], "us", "head_onnxruntime_cuda_"))
    except RuntimeError as exc:  # onnxruntime without the CUDA provider
        out["head_onnxruntime_cuda_reason"] = str(exc)
    return out
