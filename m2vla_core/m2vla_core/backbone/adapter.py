"""Frozen VLM backbone: (image, instruction) -> per-layer hidden states under a FeatureContract.

We drive the decoder layers ourselves instead of calling ``model(...)`` because that is the
only way to (a) stop at the deepest layer a head reads without mutating the shared model and
(b) feed a cached key/value prefix for the instruction. The embedding, vision tower, rope
positions, masks and decoder layers are the model's own modules; only the loop is ours, and a
test checks it equals ``model(..., output_hidden_states=True)``.

Prompt layout (fixed for every family, so reuse on/off never changes the features)::

    [chat head] [instruction] [image start] [image tokens ...] [image end]

The instruction comes first. Because the text decoders are causal and the instruction's rope
positions do not depend on the image, its hidden states and K/V are a pure function of the
instruction: we compute them once and every new frame only runs the image part against the
cached prefix. Consequence worth knowing: instruction-token features do not see the image;
image-token features are conditioned on the instruction.

Families (all reuse-capable, causal decoder + instruction-first layout):
- ``qwen2_vl`` / ``qwen2_5_vl``: Qwen2-VL / Qwen2.5-VL, 3-D M-RoPE from the model's
  ``get_rope_index``; fixed square input (multiple of patch*merge, default 224 px).
- ``idefics3`` / ``smolvlm``: Idefics3 / SmolVLM, Llama-style 1-D positions; one global image
  tile at the vision tower's native size (no image splitting).
A family with a bidirectional prefix (e.g. PaliGemma's prefix-LM) could not reuse the
instruction this way: there, text tokens attend to later image tokens.

Hidden-state index convention follows transformers' ``output_hidden_states``: 0 = embeddings
(with image features scattered in), ``l`` = output of decoder layer ``l``, and the last
index ``num_layers`` carries the model's final norm.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m2vla_core.backbone.tiny import recorded_digest, weights_digest
from m2vla_core.features import FeatureBundle, FeatureContract
from m2vla_core.instructions import clean_instruction

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
IDEFICS_TYPES = ("idefics3", "smolvlm")
SUPPORTED_MODEL_TYPES = QWEN_TYPES + IDEFICS_TYPES
PROMPT_LAYOUT = "instruction_first/v1"  # part of feature_identity: change it when the layout changes
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def image_digest(rgb: np.ndarray) -> str:
    """sha1 of an image's shape, dtype and raw bytes (cache key and provenance)."""
    h = hashlib.sha1(f"{rgb.shape}|{rgb.dtype}|".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def validate_image(image: object) -> np.ndarray:
    """The image as a C-contiguous (H, W, 3) uint8 array, or ValueError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))


def pool_image_tokens(x: torch.Tensor, grid_hw: tuple[int, int], n_out: int) -> torch.Tensor:
    """Adaptive average pool of (B, N, D) raster-ordered image tokens on their (h, w) grid to n_out.

    The output grid (a, b) with a*b = n_out is the factor pair closest to the input aspect
    ratio, so a square number pools to a square grid; n_out larger than N repeats tokens.
    """
    b, n, d = x.shape
    gh, gw = grid_hw
    if gh * gw != n:
        raise ValueError(f"image token grid {gh}x{gw} does not match {n} tokens")
    if (gh, gw) == _factor_grid(n_out, gh, gw):
        return x
    a, c = _factor_grid(n_out, gh, gw)
    grid = x.transpose(1, 2).reshape(b, d, gh, gw)  # (B, D, h, w)
    pooled = F.adaptive_avg_pool2d(grid, (a, c))  # (B, D, a, c)
    return pooled.reshape(b, d, a * c).transpose(1, 2)  # (B, n_out, D)


def _factor_grid(n: int, gh: int, gw: int) -> tuple[int, int]:
    target = np.log(gh / gw)
    pairs = [(a, n // a) for a in range(1, n + 1) if n % a == 0]
    return min(pairs, key=lambda p: (abs(np.log(p[0] / p[1]) - target), p[0]))


@dataclass
class _Plan:
    """Token layout of one instruction's prompt; built once per instruction."""

    prefix_ids: list[int]  # chat head + instruction + separator
    span: tuple[int, int]  # [start, end) of the instruction tokens inside prefix_ids
    frame_ids: list[int]  # image start + image placeholders + image end
    img_pos: torch.Tensor  # (N,) positions of the image placeholders inside frame_ids
    positions: torch.Tensor  # rope positions of prefix + frame, batch 1
    frame_embeds: torch.Tensor  # (1, F, D) token embeddings of frame_ids (placeholders overwritten later)


@dataclass
class _Prefix:
    """The instruction part of the sequence, computed once per instruction."""

    ids: list[int]  # all prefix token ids (chat head + instruction)
    span: tuple[int, int]  # [start, end) of the instruction tokens inside ids
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer run: (1, kv_heads, P, hd)
    hidden: list[torch.Tensor]  # per hidden-state index 0..layers_run: (1, P, D)


def _set_square_budget(image_processor, image_size: int) -> None:
    """Qwen2-VL processors resize to a pixel budget: make that budget the requested square."""
    image_processor.size = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}


class FrozenBackbone:
    """A transformers VLM used read-only as a feature extractor; weights never change.

    Use ``from_pretrained``. ``extract`` / ``extract_batch`` serve any FeatureContract whose
    layers exist in the model. Optimisations are per-call flags so a benchmark can time each:
    ``stop_at_deepest`` (run decoder layers only up to the contract's deepest layer) and
    ``reuse_instruction`` (reuse the instruction's K/V prefix across frames).
    """

    def __init__(self, model, tokenizer, image_processor, *, model_type: str, backbone_id: str,
                 weights_digest: str, image_size: int, max_instruction_tokens: int = 64,
                 prefix_cache_size: int = 8) -> None:
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if max_instruction_tokens < 1:
            raise ValueError(f"max_instruction_tokens must be >= 1, got {max_instruction_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_type = model_type
        self._backbone_id = backbone_id
        self._weights_digest = weights_digest
        self.image_size = int(image_size)
        self.max_instruction_tokens = int(max_instruction_tokens)
        self._prefix_cache: OrderedDict[tuple, _Prefix] = OrderedDict()
        self._plans: OrderedDict[str, _Plan] = OrderedDict()
        self._prefix_cache_size = int(prefix_cache_size)
        self._lock = threading.Lock()
        self.prefix_hits = 0
        self.prefix_misses = 0
        self._freeze()

        inner = model.model
        self._is_qwen = model_type in QWEN_TYPES
        self.text_model = inner.language_model if self._is_qwen else inner.text_model
        self.text_config = self.text_model.config
        self._layer_types = list(getattr(self.text_config, "layer_types", None)
                                 or ["full_attention"] * self.text_config.num_hidden_layers)
        unknown = sorted(set(self._layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"{backbone_id}: decoder layer types {unknown} are not supported")
        self._sliding = "sliding_attention" in self._layer_types
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._tok_id = self._special_ids()
        if self._is_qwen:
            vc = model.config.vision_config
            factor = vc.patch_size * vc.spatial_merge_size
            if self.image_size % factor:
                raise ValueError(f"image_size must be a multiple of {factor} for {model_type}, got {self.image_size}")
            side = self.image_size // factor
            self._grid = (side, side)
            self._grid_thw = torch.tensor([[1, self.image_size // vc.patch_size, self.image_size // vc.patch_size]])
        else:
            side = int(round(inner.image_seq_len ** 0.5))
            self._grid = (side, side)
            self._grid_thw = None
        self.num_image_tokens_native = self._grid[0] * self._grid[1]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                        image_size: int | None = None, max_instruction_tokens: int = 64) -> FrozenBackbone:
        """Load a supported VLM from a local dir or a hub id (safetensors only, no pickle).

        ``dtype`` None means float32 on CPU and bfloat16 (float16 without bf16 support) on CUDA.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        source = str(path_or_id)
        if source.startswith("~"):
            source = os.path.expanduser(source)
        local = Path(source).is_dir()
        if not local and _looks_like_path(source):  # never ask the hub about a local path
            if Path(source).expanduser().exists():
                raise NotADirectoryError(f"backbone {source}: not a directory (a backbone is a model directory)")
            raise FileNotFoundError(f"backbone {source}: no such directory")
        if local:
            pickles = sorted(p.name for p in Path(source).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
            if pickles and not any(Path(source).glob("*.safetensors")):
                raise ValueError(f"{source}: only pickle weight files {pickles}; m2vla loads safetensors only")
        torch_dtype = _resolve_dtype(dtype, device)
        if local:  # check before loading: a tampered or half-copied asset must not load at all
            digest = weights_digest(source)
            if (expected := recorded_digest(source)) and expected != digest:
                raise ValueError(f"{source}: weights digest {digest[:12]}… differs from the recorded {expected[:12]}…; "
                                 "the files changed after they were built")
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:  # transformers' message spans lines; keep the first
            detail = (str(exc).strip().splitlines() or [""])[0]
            raise FileNotFoundError(f"backbone {source}: cannot load its config ({detail})") from exc
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if model_type in QWEN_TYPES:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            image_processor = Qwen2VLImageProcessorPil.from_pretrained(source)
            if image_size is None:
                size = image_processor.size
                lo, hi = size.get("shortest_edge"), size.get("longest_edge")
                image_size = int(round(hi ** 0.5)) if lo and lo == hi else 224
            else:
                _set_square_budget(image_processor, image_size)
        else:
            from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

            image_processor = Idefics3ImageProcessorPil.from_pretrained(source)
            native = model.config.vision_config.image_size
            if image_size not in (None, native):
                raise ValueError(f"{model_type} takes its native image size {native}, got image_size={image_size}")
            image_size = native
        if not local:
            digest = _digest_of(source, local)
        backbone_id = f"{model_type}:{Path(source).name}" if local else source
        return cls(model, tokenizer, image_processor, model_type=model_type, backbone_id=backbone_id,
                   weights_digest=digest, image_size=image_size, max_instruction_tokens=max_instruction_tokens)

    def at_image_size(self, image_size: int) -> FrozenBackbone:
        """The same frozen model reading ``image_size`` px frames: shares the weights, loads nothing.

        Qwen2-VL-family models take any multiple of their merged patch (28 px); the others have
        one native size and raise ValueError for another.
        """
        if image_size == self.image_size:
            return self
        if not self._is_qwen:
            raise ValueError(f"{self.model_type} takes its native image size {self.image_size}, got {image_size}")
        processor = copy.deepcopy(self.image_processor)
        _set_square_budget(processor, image_size)
        return FrozenBackbone(self.model, self.tokenizer, processor, model_type=self.model_type,
                              backbone_id=self._backbone_id, weights_digest=self._weights_digest,
                              image_size=image_size, max_instruction_tokens=self.max_instruction_tokens,
                              prefix_cache_size=self._prefix_cache_size)

    def _freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def assert_frozen(self) -> None:
        """Raise RuntimeError if anything made the backbone trainable (eval mode, no grads)."""
        if self.model.training:
            raise RuntimeError(f"backbone {self.backbone_id} is in training mode")
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"backbone {self.backbone_id} has {len(trainable)} trainable parameters, e.g. {trainable[0]}")
        with_grad = [n for n, p in self.model.named_parameters() if p.grad is not None]
        if with_grad:
            raise RuntimeError(f"backbone {self.backbone_id} has gradients on {len(with_grad)} parameters, e.g. {with_grad[0]}")

    def parameter_fingerprint(self) -> str:
        """sha256 of the in-memory parameters (names + bytes): equal before and after training a head."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def backbone_id(self) -> str:
        return self._backbone_id

    @property
    def weights_digest(self) -> str:
        return self._weights_digest

    @property
    def supports_instruction_reuse(self) -> bool:
        return True  # every supported family: causal decoder + instruction-first layout

    @property
    def feature_identity(self) -> str:
        """Everything that changes the numbers a contract yields: weights, layout, input size, dtype.

        Use it (not only weights_digest) in feature-cache keys.
        """
        parts = (self._weights_digest, PROMPT_LAYOUT, str(self.image_size), str(self.max_instruction_tokens),
                 str(self.dtype))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def contract(self, layers: Sequence[int], num_image_tokens: int | None = None, num_text_tokens: int = 16,
                 dtype: str = "float32") -> FeatureContract:
        """A FeatureContract for this backbone (width filled in; image tokens default to native).

        Its ``image_size`` stays 0 (the backbone's default input size); a caller that loaded the
        backbone at another size on purpose records that size in the contract (``m2vla features
        --image-size``), so every consumer of the head loads the backbone the same way.
        """
        return FeatureContract(layers=tuple(int(l) for l in layers),
                               num_image_tokens=num_image_tokens or self.num_image_tokens_native,
                               num_text_tokens=num_text_tokens, width=self.hidden_size, dtype=dtype)

    def check_contract(self, contract: FeatureContract) -> None:
        if not isinstance(contract, FeatureContract):
            raise ValueError(f"contract must be a FeatureContract, got {type(contract).__name__}")
        if contract.deepest_layer > self.num_layers:
            raise ValueError(f"contract reads layer {contract.deepest_layer} but backbone {self.backbone_id} has "
                             f"{self.num_layers} layers (valid hidden-state indices 0..{self.num_layers})")
        if contract.width != self.hidden_size:
            raise ValueError(f"contract width {contract.width} != backbone {self.backbone_id} hidden size {self.hidden_size}")
        if contract.image_size and contract.image_size != self.image_size:
            raise ValueError(f"contract wants {contract.image_size} px frames, backbone {self.backbone_id} was loaded "
                             f"at {self.image_size} px (load it with image_size={contract.image_size})")

    # ------------------------------------------------------------------ extraction
    def extract(self, image: np.ndarray, instruction: str, contract: FeatureContract, *,
                stop_at_deepest: bool = True, reuse_instruction: bool = True) -> FeatureBundle:
        """Features of one (H, W, 3) uint8 RGB frame and its instruction, shaped by ``contract``."""
        if not isinstance(instruction, str):
            raise ValueError(f"instruction must be a str, got {type(instruction).__name__}")
        return self.extract_batch([image], instruction, contract, stop_at_deepest=stop_at_deepest,
                                  reuse_instruction=reuse_instruction)[0]

    def extract_batch(self, images: Sequence[np.ndarray], instructions: str | Sequence[str], contract: FeatureContract,
                      *, stop_at_deepest: bool = True, reuse_instruction: bool = True,
                      batch_size: int = 16) -> list[FeatureBundle]:
        """Features of many frames (dataset precompute); frames sharing an instruction run batched."""
        self.check_contract(contract)
        images = [validate_image(im) for im in images]
        if isinstance(instructions, str):
            instructions = [instructions] * len(images)
        elif not isinstance(instructions, (list, tuple)):
            raise ValueError(f"instruction must be a str (or a list of str for a batch), got {type(instructions).__name__}")
        if len(instructions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
        cleaned = [clean_instruction(t) for t in instructions]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[FeatureBundle | None] = [None] * len(images)
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(cleaned):
            groups.setdefault(text, []).append(i)
        n_run = contract.deepest_layer if stop_at_deepest else self.num_layers
        for text, idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                hidden, mask = self._forward_group([images[i] for i in chunk], text, contract, n_run, reuse_instruction)
                for row, i in enumerate(chunk):
                    row_hidden = hidden[row] if len(chunk) == 1 else hidden[row].clone()  # own storage per row
                    out[i] = FeatureBundle(hidden=row_hidden, mask=mask.clone(), contract=contract,
                                           backbone_id=self.backbone_id, instruction=text,
                                           image_digest=image_digest(images[i]),
                                           extra={"layers_run": n_run, "reused_instruction": bool(reuse_instruction)})
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _forward_group(self, images: list[np.ndarray], instruction: str, contract: FeatureContract, n_run: int,
                       reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, n_layers, T, D) in contract dtype, mask (T,)) for frames sharing one instruction."""
        b = len(images)
        want = set(contract.layers)
        plan = self._plan(instruction)
        p, f = len(plan.prefix_ids), len(plan.frame_ids)
        image_embeds = self._image_embeds(images)  # (B, N, D)
        frame_embeds = plan.frame_embeds.expand(b, -1, -1).clone()  # (B, F, D)
        frame_embeds[:, plan.img_pos] = image_embeds.to(frame_embeds.dtype)
        pos = plan.positions  # (3, 1, P+F) M-RoPE | (1, P+F)
        if reuse:
            prefix = self._prefix(plan, n_run)
            cache = None
            if prefix.kv:
                from transformers import DynamicCache

                kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix.kv]  # (B, kvh, P, hd)
                cache = DynamicCache(ddp_cache_data=kv, config=self.text_config if self._sliding else None)
            states = self._run_layers(frame_embeds, pos[..., p:].expand(*pos.shape[:-2], b, f), cache, n_run, want)
            text_states = {l: prefix.hidden[l] for l in want}  # (1, P, D)
            image_states = {l: states[l][:, plan.img_pos] for l in want}  # (B, N, D)
        else:
            seq = torch.cat([self._embed(plan.prefix_ids).expand(b, -1, -1), frame_embeds], dim=1)  # (B, P+F, D)
            states = self._run_layers(seq, pos.expand(*pos.shape[:-2], b, p + f), None, n_run, want)
            text_states = {l: states[l][:1, :p] for l in want}  # (1, P, D): identical across the batch
            image_states = {l: states[l][:, p + plan.img_pos] for l in want}  # (B, N, D)
        return self._assemble(text_states, image_states, plan.span, contract, b)

    def _assemble(self, text_states, image_states, span, contract: FeatureContract, b: int):
        layers = list(contract.layers)
        img = torch.stack([image_states[l] for l in layers], dim=1)  # (B, nL, N, D)
        nl, n, d = img.shape[1:]
        img = pool_image_tokens(img.reshape(b * nl, n, d), self._grid, contract.num_image_tokens)
        img = img.reshape(b, nl, contract.num_image_tokens, d)  # (B, nL, n_img, D)
        s0, s1 = span
        n_txt = min(s1 - s0, contract.num_text_tokens)
        txt = torch.zeros(1, nl, contract.num_text_tokens, d, dtype=img.dtype, device=img.device)
        txt[:, :, :n_txt] = torch.stack([text_states[l][:, s0:s0 + n_txt] for l in layers], dim=1)  # (1, nL, n_txt, D)
        hidden = torch.cat([img, txt.expand(b, -1, -1, -1)], dim=2)  # (B, nL, T, D)
        hidden = hidden.to(_TORCH_DTYPES[contract.dtype]).contiguous()
        mask = torch.zeros(contract.num_tokens, dtype=torch.bool, device=hidden.device)
        mask[: contract.num_image_tokens + n_txt] = True
        return hidden, mask

    # ------------------------------------------------------------------ model pieces
    def _special_ids(self) -> dict[str, int | None]:
        def tid(token: str) -> int | None:
            i = self.tokenizer.convert_tokens_to_ids(token)
            return None if i is None or i == self.tokenizer.unk_token_id else int(i)

        if self._is_qwen:
            ids = {"image": self.model.config.image_token_id, "start": tid("<|vision_start|>"),
                   "end": tid("<|vision_end|>"), "turn": tid("<|im_start|>")}
        else:
            ids = {"image": self.model.config.image_token_id, "start": tid("<fake_token_around_image>"),
                   "global": tid("<global-img>"), "end": tid("<fake_token_around_image>"), "turn": tid("<|im_start|>")}
        return ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prefix_ids(self, instruction: str) -> tuple[list[int], tuple[int, int]]:
        head = [self._tok_id["turn"]] if self._tok_id["turn"] is not None else []
        head += self._encode("user\n" if self._is_qwen else "User: ")
        instr = self._encode(instruction)[: self.max_instruction_tokens]
        tail = self._encode("\n")
        return head + instr + tail, (len(head), len(head) + len(instr))

    def _frame_ids(self) -> list[int]:
        n = self.num_image_tokens_native
        t = self._tok_id
        if self._is_qwen:
            return [t["start"], *([t["image"]] * n), t["end"]]
        mid = [t["global"]] if t["global"] is not None else []
        return [t["start"], *mid, *([t["image"]] * n), t["end"]]

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.text_model.embed_tokens(torch.tensor([ids], device=self.device))  # (1, S, D)

    def _image_embeds(self, images: list[np.ndarray]) -> torch.Tensor:
        """Vision tower + projector on square-resized frames: (B, N, D)."""
        frames = [_resize_square(im, self.image_size) for im in images]
        inner = self.model.model
        if self._is_qwen:
            px = self.image_processor(images=frames, return_tensors="pt")
            grid = px["image_grid_thw"].to(self.device)
            feats = inner.get_image_features(px["pixel_values"].to(self.device), grid).pooler_output
        else:
            px = self.image_processor(images=[[fr] for fr in frames], return_tensors="pt", do_image_splitting=False)
            feats = inner.get_image_features(px["pixel_values"].to(self.device),
                                             px["pixel_attention_mask"].to(self.device)).pooler_output
        feats = torch.stack(list(feats), dim=0)  # (B, N, D)
        if feats.shape[1] != self.num_image_tokens_native:
            raise RuntimeError(f"vision tower gave {feats.shape[1]} tokens, expected {self.num_image_tokens_native}")
        return feats

    def _positions(self, ids: list[int]) -> torch.Tensor:
        """Rope positions of the whole sequence for batch 1: (3, 1, S) for M-RoPE, (1, S) otherwise."""
        input_ids = torch.tensor([ids], device=self.device)
        if not self._is_qwen:
            return torch.arange(len(ids), device=self.device)[None]
        types = (input_ids == self._tok_id["image"]).int()
        pos, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=types,
                                                 image_grid_thw=self._grid_thw.to(self.device))
        return pos

    def _plan(self, instruction: str) -> _Plan:
        with self._lock:
            hit = self._plans.get(instruction)
            if hit is not None:
                self._plans.move_to_end(instruction)
                return hit
        prefix_ids, span = self._prefix_ids(instruction)
        frame_ids = self._frame_ids()
        img_pos = torch.tensor([i for i, t in enumerate(frame_ids) if t == self._tok_id["image"]], device=self.device)
        plan = _Plan(prefix_ids=prefix_ids, span=span, frame_ids=frame_ids, img_pos=img_pos,
                     positions=self._positions(prefix_ids + frame_ids), frame_embeds=self._embed(frame_ids))
        with self._lock:
            self._plans[instruction] = plan
            while len(self._plans) > self._prefix_cache_size:
                self._plans.popitem(last=False)
        return plan

    def _prefix(self, plan: _Plan, n_run: int) -> _Prefix:
        """The instruction's K/V and hidden states for layers < n_run, computed once (LRU)."""
        key = (tuple(plan.prefix_ids), n_run)
        with self._lock:
            hit = self._prefix_cache.get(key)
            if hit is not None:
                self._prefix_cache.move_to_end(key)
                self.prefix_hits += 1
                return hit
        from transformers import DynamicCache

        p = len(plan.prefix_ids)
        cache = DynamicCache(config=self.text_config)
        states = self._run_layers(self._embed(plan.prefix_ids), plan.positions[..., :p], cache, n_run,
                                  set(range(n_run + 1)))
        kv = [(cache.layers[i].keys, cache.layers[i].values) for i in range(n_run)]
        prefix = _Prefix(ids=list(plan.prefix_ids), span=plan.span, kv=kv, hidden=[states[l] for l in range(n_run + 1)])
        with self._lock:
            self.prefix_misses += 1
            self._prefix_cache[key] = prefix
            while len(self._prefix_cache) > self._prefix_cache_size:
                self._prefix_cache.popitem(last=False)
        return prefix

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, cache, n_run: int, want: set[int]) -> dict[int, torch.Tensor]:
        """Run decoder layers 0..n_run-1 on embeddings x (B, S, D); return the wanted hidden states.

        ``cache`` (a DynamicCache, possibly pre-filled with a prefix) is extended in place.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        tm = self.text_model
        layer_positions = None if self._is_qwen else positions  # qwen passes no text positions in the non-packed case
        mask_args = dict(config=self.text_config, inputs_embeds=x, attention_mask=None, past_key_values=cache,
                         position_ids=layer_positions)
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if self._sliding:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        rope = tm.rotary_emb(x, positions)
        out = {0: x} if 0 in want else {}
        h = x
        for i in range(n_run):
            h = tm.layers[i](h, attention_mask=masks[self._layer_types[i]], position_embeddings=rope,
                             position_ids=layer_positions, past_key_values=cache, use_cache=cache is not None)
            if i + 1 in want:
                out[i + 1] = tm.norm(h) if i + 1 == self.num_layers else h
        return out


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local path rather than a hub id ("org/name" or "name"): it
    starts with '/', '.' or '~', holds a backslash, more than one '/' or a trailing '/', exists
    here, or its first component does (``out/backbone`` next to an ``out`` directory). A missing
    one such is refused at once instead of sending transformers to the hub (retries, ~30 s offline)."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/"):
        return True
    return Path(source).exists() or ("/" in source and Path(source.split("/", 1)[0]).exists())


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise ValueError(f"dtype must be one of {list(_TORCH_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(_TORCH_DTYPES)}, got {dtype!r}")
    return _TORCH_DTYPES[dtype]


def _digest_of(source: str, local: bool) -> str:
    if local:
        return weights_digest(source)
    from huggingface_hub import snapshot_download

    return weights_digest(snapshot_download(source, allow_patterns=["*.safetensors"], local_files_only=True))
