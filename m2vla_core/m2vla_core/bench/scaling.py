"""How the head's latency scales with what it reads and emits, and how big the feature
message of a real backbone is with and without the feature contract."""

from __future__ import annotations

from dataclasses import dataclass

from m2vla_core.bench.heads import TINY_CONTRACT, OrtHead, make_head
from m2vla_core.bench.settings import BenchSettings
from m2vla_core.bench.timing import interleaved, summarize
from m2vla_core.features import FeatureContract

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class BackboneShape:
    """Text-decoder numbers from the model's config.json (hidden_size, num_hidden_layers)."""

    name: str
    hidden_size: int
    num_layers: int
    image_tokens: int = 64  # 224x224 input, 14 px patches, 2x2 merge (Qwen2-VL / Qwen2.5-VL)
    text_tokens: int = 20  # chat head + a robot instruction


BACKBONES = (
    BackboneShape("tiny-qwen2vl (shipped)", 128, 6),
    BackboneShape("Qwen2.5-VL-3B", 2048, 36),  # Qwen/Qwen2.5-VL-3B-Instruct config.json
    BackboneShape("Qwen2.5-VL-7B", 3584, 28),  # Qwen/Qwen2.5-VL-7B-Instruct config.json
)


def feature_message_bytes(contract: FeatureContract) -> list[dict]:
    """Bytes per frame: every hidden state of every token (what a naive server would ship) vs
    the contract (its layers, pooled image tokens + capped text tokens) — payload only."""
    rows = []
    for bb in BACKBONES:
        tokens_full = bb.image_tokens + bb.text_tokens
        full = {d: (bb.num_layers + 1) * tokens_full * bb.hidden_size * n for d, n in DTYPE_BYTES.items()}
        ours = {d: len(contract.layers) * contract.num_tokens * bb.hidden_size * n for d, n in DTYPE_BYTES.items()}
        rows.append({"backbone": bb.name, "hidden_size_count": bb.hidden_size, "num_layers_count": bb.num_layers,
                     "all_layers_float32_bytes": full["float32"], "all_layers_bfloat16_bytes": full["bfloat16"],
                     "contract_float32_bytes": ours["float32"], "contract_bfloat16_bytes": ours["bfloat16"],
                     "contract_saves_fraction": 1.0 - ours["float32"] / full["float32"]})
    return rows


def _time(head, settings: BenchSettings) -> dict:
    runner = OrtHead(head, threads=settings.threads)
    return summarize(interleaved({"h": runner.step_ort}, settings.scaling_iters, warmup=10)["h"], "us")


def run(settings: BenchSettings) -> dict:
    base = TINY_CONTRACT
    layers = []
    for n in settings.scaling_layers:
        idx = tuple(sorted({round(6 * (i + 1) / n) for i in range(n)}))  # n layers spread over 1..6
        contract = FeatureContract(layers=idx, num_image_tokens=base.num_image_tokens,
                                   num_text_tokens=base.num_text_tokens, width=base.width)
        layers.append({"layers_count": len(idx), "layers": list(idx), **_time(make_head(contract), settings)})
    tokens = []
    for n_img in settings.scaling_image_tokens:
        contract = FeatureContract(layers=base.layers, num_image_tokens=n_img, num_text_tokens=base.num_text_tokens,
                                   width=base.width)
        tokens.append({"tokens_count": contract.num_tokens, **_time(make_head(contract), settings)})
    top_k = [{"skills_k_count": k, **_time(make_head(base, top_k=k), settings)} for k in settings.scaling_top_k]
    chunk = [{"chunk_len_count": h, **_time(make_head(base, chunk_len=h), settings)} for h in settings.scaling_chunk_len]
    return {"backend": "onnxruntime", "iters_count": settings.scaling_iters,
            "head_vs_layers": layers, "head_vs_tokens": tokens, "head_vs_skills_k": top_k, "head_vs_chunk_len": chunk,
            "feature_message": feature_message_bytes(base)}
