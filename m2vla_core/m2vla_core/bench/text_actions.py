"""One MoL+MSM chunk vs the same chunk decoded autoregressively as text tokens, same backbone.

The text-action baseline (VLM2VLA / OpenVLA style) runs the whole VLM on (instruction, image)
and then greedily generates H*A action tokens with the KV cache, one token per action value
(OpenVLA maps 256 bins onto the last 256 vocabulary ids; we decode the ids the same way). Our
path runs the backbone only to the head's deepest layer, reusing the instruction prefix, then
one head step in onnxruntime. Both run interleaved per frame, on new frames each time.
"""

from __future__ import annotations

import numpy as np
import torch

from m2vla_core.bench.backbone import frames, load_backbone
from m2vla_core.bench.heads import OrtHead, make_head
from m2vla_core.bench.settings import INSTRUCTION, BenchSettings
from m2vla_core.bench.timing import interleaved, ratio, summarize
from m2vla_core.features import FeatureContract

ACTION_BINS = 256
TARGET_SPEEDUP = 10.0  # DESIGN.md: MoL+MSM chunk >= 10x faster than text actions


class TextActionDecoder:
    """Greedy text-action decoding with transformers' ``generate`` on the backbone's own model."""

    def __init__(self, bb) -> None:
        self.bb = bb
        model = bb.model
        tok = bb.tokenizer
        image_id = model.config.image_token_id
        n_img = bb.num_image_tokens_native
        vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
        head = [tok.convert_tokens_to_ids("<|im_start|>")] + tok("user\n", add_special_tokens=False)["input_ids"]
        prompt = head + tok(INSTRUCTION, add_special_tokens=False)["input_ids"] + [vs] + [image_id] * n_img + [ve]
        prompt += tok("\nassistant\n", add_special_tokens=False)["input_ids"]
        self.input_ids = torch.tensor([prompt], device=bb.device)  # (1, P)
        self.mm_token_type_ids = (self.input_ids == image_id).int()  # (1, P): 1 on image placeholders
        self.vocab_size = int(model.config.text_config.vocab_size)

    @torch.no_grad()
    def decode(self, image: np.ndarray, num_tokens: int) -> np.ndarray:
        """(num_tokens,) action bins in [0, 256) for one frame (greedy, KV cache, no early stop)."""
        px = self.bb.image_processor(images=[image], return_tensors="pt")
        out = self.bb.model.generate(
            input_ids=self.input_ids, attention_mask=torch.ones_like(self.input_ids),
            pixel_values=px["pixel_values"].to(self.bb.device), image_grid_thw=px["image_grid_thw"].to(self.bb.device),
            mm_token_type_ids=self.mm_token_type_ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            do_sample=False, use_cache=True, pad_token_id=self.bb.tokenizer.pad_token_id)
        tokens = out[0, self.input_ids.shape[1]:].cpu().numpy()
        if tokens.size != num_tokens:
            raise RuntimeError(f"generate returned {tokens.size} tokens, expected {num_tokens}")
        return np.clip(tokens - (self.vocab_size - ACTION_BINS), 0, ACTION_BINS - 1)  # OpenVLA-style bin ids


def run(settings: BenchSettings, head) -> dict:
    """``head``: the policy's head (shipped or random); its contract, H and A set the comparison."""
    contract, chunk_len, action_dim = head.config.contract, head.config.chunk_len, head.config.action_dim
    bb = load_backbone(settings.threads)
    decoder = TextActionDecoder(bb)
    images = frames(settings.text_iters + 1, seed=2)
    ours = OrtHead(head, threads=settings.threads)

    def mol_msm(i: int):
        bundle = bb.extract(images[i], INSTRUCTION, contract)
        hidden, mask = bundle.numpy()
        return ours.ort.infer(hidden[None], mask[None], ours.inputs[2])  # (1, H, A)

    def features(i: int):
        return bb.extract(images[i], INSTRUCTION, contract)

    n_tokens = chunk_len * action_dim
    samples = interleaved({"mol_msm": mol_msm, "features": features,
                           "text": lambda i: decoder.decode(images[i], n_tokens)}, settings.text_iters, warmup=1)
    head_samples = interleaved({"head": ours.step_ort}, max(50, settings.text_iters * 10), warmup=5)["head"]
    out: dict = {
        "chunk_len_count": chunk_len, "action_dim_count": action_dim, "text_tokens_count": n_tokens,
        "iters_count": settings.text_iters,
        **summarize(samples["text"], "ms", "text_actions_"),
        **summarize(samples["mol_msm"], "ms", "mol_msm_"),
        **summarize(samples["features"], "ms", "features_"),
        **summarize(head_samples, "us", "head_"),
    }
    out["text_actions_per_token_ms"] = out["text_actions_p50_ms"] / n_tokens
    out["speedup_vs_text_actions"] = ratio(out["text_actions_p50_ms"], out["mol_msm_p50_ms"])
    out["target_speedup"] = TARGET_SPEEDUP
    out["target_met"] = out["speedup_vs_text_actions"] >= TARGET_SPEEDUP
    out["scaling"] = _scaling(bb, decoder, contract, settings, out["features_p50_ms"])
    return out


def _scaling(bb, decoder: TextActionDecoder, contract: FeatureContract, settings: BenchSettings,
             features_ms: float) -> list[dict]:
    """Both paths at several (H, A): text cost grows with H*A tokens, the head's barely moves."""
    rows = []
    images = frames(settings.text_scaling_iters + 1, seed=3)
    for h, a in settings.text_scaling_points:
        head = OrtHead(make_head(contract, chunk_len=h, action_dim=a), threads=settings.threads)
        head_s = interleaved({"head": head.step_ort}, max(50, settings.scaling_iters // 4), warmup=5)["head"]
        text_s = interleaved({"text": lambda i: decoder.decode(images[i], h * a)}, settings.text_scaling_iters,
                             warmup=1)["text"]
        row = {"chunk_len_count": h, "action_dim_count": a, "text_tokens_count": h * a,
               **summarize(text_s, "ms", "text_actions_"), **summarize(head_s, "us", "head_")}
        row["mol_msm_p50_ms"] = features_ms + row["head_p50_us"] / 1e3
        row["speedup_vs_text_actions"] = ratio(row["text_actions_p50_ms"], row["mol_msm_p50_ms"])
        rows.append(row)
    return rows
