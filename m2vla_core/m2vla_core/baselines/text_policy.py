"""VLM2VLA-style baseline: the VLM itself writes the action chunk as text, LoRA-only fine-tuned.

Prompt (the backbone's own chat tokens, no new vocabulary)::

    <|im_start|>user\\n{instruction}<|vision_start|><|image_pad|>*N<|vision_end|>\\nstate {digits}\\nassistant\\n

target: ``{waypoint words}<|endoftext|>`` (see ``action_text``). Training updates only LoRA
adapters on the language model's linear layers (``peft``); the vision tower, embeddings and
LM head stay as shipped. At run time the chunk is decoded greedily with the KV cache.

Checkpoint: ``text_policy.json`` (TextPolicyConfig, strict) + ``adapter.safetensors`` (LoRA
tensors only). Loading rebuilds the adapter on the shipped backbone (id + digest checked)
and never unpickles anything.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2vla_core.baselines.action_text import ActionTextCodec
from m2vla_core.baselines.configuration_text_policy import (ActionTextConfig, LoraSettings, TextPolicyConfig,
                                                            TextTrainConfig)
from m2vla_core.config_io import save_json
from m2vla_core.heads.checkpoint import (CheckpointError, atomic_save_safetensors, check_safetensors_file,
                                        load_config_file, refuse_pickles)

CONFIG_NAME = "text_policy.json"
ADAPTER_NAME = "adapter.safetensors"
IGNORE = -100  # label of prompt tokens (no loss)


def load_base_model(backbone_path: str | os.PathLike | None = None):
    """(model, tokenizer, image_processor, backbone_id, digest) of the shipped tiny Qwen2-VL, eval mode."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from m2vla_core.backbone.tiny import default_backbone_path, recorded_digest, weights_digest

    path = str(backbone_path or default_backbone_path())
    digest = weights_digest(path)
    if (expected := recorded_digest(path)) and expected != digest:
        raise ValueError(f"{path}: weights digest {digest[:12]}… differs from the recorded {expected[:12]}…")
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()
    if model.config.model_type != "qwen2_vl":
        raise ValueError(f"{path}: the text baseline supports qwen2_vl, got {model.config.model_type!r}")
    tok = AutoTokenizer.from_pretrained(path)
    proc = Qwen2VLImageProcessorPil.from_pretrained(path)
    return model, tok, proc, f"qwen2_vl:{Path(path).name}", digest


def add_lora(model, lora: LoraSettings):
    """Wrap ``model`` with LoRA adapters; only adapter tensors are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                     bias="none")
    return get_peft_model(model, cfg)


class TextActionPolicy:
    """The VLM + codec: prompt building, batched training inputs, greedy chunk decoding."""

    def __init__(self, model, tokenizer, image_processor, config: TextPolicyConfig) -> None:
        self.model = model
        self.tok = tokenizer
        self.proc = image_processor
        self.config = config
        self.codec = ActionTextCodec(config.codec)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.inner = inner
        cfg = inner.config
        vc = cfg.vision_config
        size = int(round(image_processor.size["longest_edge"] ** 0.5))
        self.image_size = size
        self.num_image_tokens = (size // vc.patch_size // vc.spatial_merge_size) ** 2
        self.image_id = int(cfg.image_token_id)
        self.eos_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self._head = [tokenizer.convert_tokens_to_ids("<|im_start|>")] + self._ids("user\n")
        self._vision = ([tokenizer.convert_tokens_to_ids("<|vision_start|>")] + [self.image_id] * self.num_image_tokens
                        + [tokenizer.convert_tokens_to_ids("<|vision_end|>")])

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    # -- prompts ------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str, state: np.ndarray) -> list[int]:
        return (self._head + self._ids(instruction) + self._vision
                + self._ids(f"\nstate {self.codec.encode_state(state)}\nassistant\n"))

    def target_ids(self, chunk: np.ndarray, state: np.ndarray) -> list[int]:
        return self._ids(self.codec.encode(chunk, state)) + [self.eos_id]

    def max_new_tokens(self) -> int:
        c = self.config.codec
        return c.chunk_len * (2 * c.action_dim + 1) + 1  # digits + separators (+ eos)

    def pixels(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        from m2vla_core.backbone.adapter import _resize_square

        px = self.proc(images=[_resize_square(im, self.image_size) for im in images], return_tensors="pt")
        return {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}

    def training_batch(self, samples: list[tuple]) -> dict[str, torch.Tensor]:
        """samples of (image, instruction, state, chunk) -> right-padded model inputs with labels."""
        seqs, labels = [], []
        for _, instruction, state, chunk in samples:
            p, t = self.prompt_ids(instruction, state), self.target_ids(chunk, state)
            seqs.append(p + t)
            labels.append([IGNORE] * len(p) + t)
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.eos_id, dtype=torch.long)  # (B, S)
        lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)], lab[i, : len(l)], att[i, : len(s)] = torch.tensor(s), torch.tensor(l), 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab, "mm_token_type_ids": (ids == self.image_id).long(),
                **self.pixels([s[0] for s in samples])}

    # -- run time -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_text(self, image: np.ndarray, instruction: str, state: np.ndarray, *,
                      full_length: bool = False) -> tuple[str, int]:
        """Greedy reply and its token count; ``full_length`` ignores EOS (a full chunk's cost, for timing)."""
        ids = torch.tensor([self.prompt_ids(instruction, state)])  # (1, P)
        n = self.max_new_tokens()
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == self.image_id).long(),
                                  **self.pixels([image]), max_new_tokens=n, min_new_tokens=n if full_length else 0,
                                  do_sample=False, use_cache=True, eos_token_id=self.eos_id, pad_token_id=self.eos_id)
        new = out[0, ids.shape[1]:]
        return self.tok.decode(new, skip_special_tokens=True), int(new.numel())

    def infer_chunk(self, image: np.ndarray, instruction: str, state: np.ndarray) -> tuple[np.ndarray, bool, int]:
        """-> (absolute joint targets (H, A), reply well formed, tokens generated)."""
        text, n = self.generate_text(image, instruction, state)
        chunk, ok = self.codec.decode(text, state)
        return chunk, ok, n

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # -- checkpoint ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        from peft import get_peft_model_state_dict

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(get_peft_model_state_dict(self.model), d / ADAPTER_NAME,
                                {"format": "m2vla-text-policy-lora", "version": "1"})
        save_json(self.config, d / CONFIG_NAME)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, backbone_path: str | os.PathLike | None = None) -> "TextActionPolicy":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"{d}: text policy directory not found")
        refuse_pickles(d)
        config = load_config_file(TextPolicyConfig, d / CONFIG_NAME, f"{d}: no {CONFIG_NAME}")
        model, tok, proc, bid, digest = load_base_model(backbone_path)
        if (bid, digest) != (config.backbone_id, config.backbone_digest):
            raise CheckpointError(f"{d}: adapter trained on {config.backbone_id} ({config.backbone_digest[:12]}…), "
                                  f"refusing to run it on {bid} ({digest[:12]}…)")
        check_safetensors_file(d / ADAPTER_NAME)
        state = load_file(str(d / ADAPTER_NAME))
        model = add_lora(model, config.lora)
        result = set_peft_model_state_dict(model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
        if unexpected or missing:
            raise CheckpointError(f"{d / ADAPTER_NAME}: adapter tensors do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
        model.eval()
        return cls(model, tok, proc, config)


# ----------------------------------------------------------------------------------------- data
def load_samples(data_dir: str | os.PathLike, chunk_len: int, tasks=None) -> list[tuple]:
    """LeRobot dataset -> [(image, instruction, state (S,), target chunk (H, A))] per frame."""
    from m2vla_core.backbone.cli import future_chunks
    from m2vla_core.instructions import clean_instruction
    from m2vla_core.sim.lerobot_io import load_lerobot_episodes

    out = []
    for ep in load_lerobot_episodes(data_dir):
        if tasks and ep.task not in tasks:
            continue
        chunks = future_chunks(ep.actions, chunk_len)  # (T, H, A)
        text = clean_instruction(ep.instruction)
        for t in range(len(ep)):
            out.append((ep.frames[t], text, np.asarray(ep.states[t], np.float32), chunks[t]))
    if not out:
        raise ValueError(f"{data_dir}: no frames to train on")
    return out


def codec_from_samples(samples: list[tuple], chunk_len: int, q: float) -> ActionTextConfig:
    """Bin ranges from the training data: [q, 1-q] quantiles of deltas / states, widened by 10 %."""
    states = np.stack([s[2] for s in samples])  # (N, S)
    deltas = np.concatenate([s[3] - s[2][None, : s[3].shape[1]] for s in samples])  # (N * H, A)

    def span(x: np.ndarray, lo_q: float):
        lo, hi = np.quantile(x, lo_q, axis=0), np.quantile(x, 1 - lo_q, axis=0)
        pad = np.maximum((hi - lo) * 0.05, 1e-3)
        return tuple(float(v) for v in lo - pad), tuple(float(v) for v in hi + pad)

    a_lo, a_hi = span(deltas, q)
    s_lo, s_hi = span(states, 0.0)
    return ActionTextConfig(chunk_len=chunk_len, action_low=a_lo, action_high=a_hi, state_low=s_lo, state_high=s_hi)


@dataclass
class TextTrainResult:
    policy: TextActionPolicy
    losses: list[float]
    seconds: float
    trainable_params: int
    total_params: int


def train_text_policy(data: str | os.PathLike | list, out_dir: str | os.PathLike | None, train: TextTrainConfig | None = None,
                      *, lora: LoraSettings | None = None, backbone_path=None, tasks=None,
                      progress: bool = True) -> TextTrainResult:
    """LoRA-only fine-tuning on (image, instruction, state) -> action text; saves to ``out_dir``.

    ``data``: a LeRobot dataset directory or a list of ``load_samples``-style tuples.
    """
    from tqdm import tqdm

    train = train or TextTrainConfig()
    samples = list(data) if isinstance(data, (list, tuple)) else load_samples(data, train.chunk_len, tasks)
    if any(np.shape(s[3])[0] != train.chunk_len for s in samples):
        raise ValueError(f"samples must carry chunks of chunk_len={train.chunk_len} waypoints")
    codec = codec_from_samples(samples, train.chunk_len, train.range_quantile)
    torch.manual_seed(train.seed)
    model, tok, proc, bid, digest = load_base_model(backbone_path)
    model = add_lora(model, lora or LoraSettings())
    config = TextPolicyConfig(codec=codec, backbone_id=bid, backbone_digest=digest, lora=lora or LoraSettings())
    policy = TextActionPolicy(model, tok, proc, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    rng = np.random.default_rng(train.seed)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in tqdm(range(train.steps), desc="text-lora", disable=not progress, dynamic_ncols=True):
        for g in opt.param_groups:  # linear warm-up over 5 % then constant
            g["lr"] = train.lr * min(1.0, (step + 1) / max(1, train.steps // 20))
        batch = policy.training_batch([samples[i] for i in rng.integers(len(samples), size=train.batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    seconds = time.perf_counter() - t0
    if out_dir:
        policy.save(out_dir)
    total = sum(p.numel() for p in model.parameters())
    return TextTrainResult(policy, losses, seconds, policy.trainable_parameters(), total)


class TextAgent:
    """Rollout agent (``reset`` / ``act``) around a TextActionPolicy; records decode latency."""

    def __init__(self, policy: TextActionPolicy) -> None:
        self.policy = policy
        self.head_ms: list[float] = []  # whole chunk: VLM prefill + greedy decode
        self.backbone_ms: list[float] = []  # (not separable here; kept for the eval report's schema)
        self.tokens: list[int] = []
        self.malformed = 0
        self.chunks = 0

    @property
    def chunk_len(self) -> int:
        return self.policy.config.codec.chunk_len

    def reset(self) -> None:
        pass

    def act(self, observation) -> np.ndarray:
        t0 = time.perf_counter()
        chunk, ok, n = self.policy.infer_chunk(observation.image, observation.instruction,
                                               np.asarray(observation.joint_positions, dtype=np.float32))
        self.head_ms.append((time.perf_counter() - t0) * 1e3)
        self.backbone_ms.append(0.0)
        self.tokens.append(n)
        self.malformed += not ok
        self.chunks += 1
        return chunk


def latency_comparison(policy: TextActionPolicy, head_checkpoint, frames: list[tuple], *, warmup: int = 1) -> dict:
    """Per-chunk latency on the same frames, interleaved in one process: text policy (full-length
    greedy chunk) vs frozen backbone features + MoL+MSM head (onnxruntime). ``frames``: (image, instruction, state)."""
    from m2vla_core.backbone.adapter import FrozenBackbone
    from m2vla_core.backbone.tiny import default_backbone_path
    from m2vla_core.export.runtime import HeadPolicy

    bb = FrozenBackbone.from_pretrained(default_backbone_path())
    head = HeadPolicy.load(head_checkpoint, backend="onnxruntime", backbone=(bb.backbone_id, bb.weights_digest))
    text_ms, ours_ms = [], []
    for i, (image, instruction, state) in enumerate(frames):
        t0 = time.perf_counter()
        _, n = policy.generate_text(image, instruction, state, full_length=True)
        t1 = time.perf_counter()
        hidden, mask = bb.extract(image, instruction, head.config.contract).numpy()
        head.infer(hidden, mask, state)
        t2 = time.perf_counter()
        if i >= warmup:
            text_ms.append((t1 - t0) * 1e3)
            ours_ms.append((t2 - t1) * 1e3)
    text_p50, ours_p50 = float(np.median(text_ms)), float(np.median(ours_ms))
    c = policy.config.codec
    return {"frames": len(text_ms), "text_tokens_per_chunk": policy.max_new_tokens(), "text_chunk_len": c.chunk_len,
            "text_chunk_ms_p50": text_p50, "text_ms_per_waypoint_p50": text_p50 / c.chunk_len,
            "mol_msm_chunk_ms_p50": ours_p50, "mol_msm_chunk_len": head.config.chunk_len,
            "mol_msm_ms_per_waypoint_p50": ours_p50 / head.config.chunk_len,
            "speedup_per_chunk": text_p50 / ours_p50,
            "speedup_per_waypoint": (text_p50 / c.chunk_len) / (ours_p50 / head.config.chunk_len)}
