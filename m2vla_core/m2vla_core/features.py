"""The feature contract between the frozen backbone and a trained head.

A head's checkpoint declares which hidden-state layers it reads, how many image and text
tokens per layer, and the dtype. Perception computes exactly that and nothing more (the
VLM stops at the deepest declared layer), and the same shapes cross the ROS topic
``/m2vla/features``. Keeping the contract in one small dataclass means a mismatch fails at
load time, not as a silent wrong action.

Hidden-state index convention (transformers' ``output_hidden_states``): 0 is the embedding
output, ``l`` is the output of decoder layer ``l``, ``num_layers`` is the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FeatureContract:
    layers: tuple[int, ...]  # hidden-state indices, strictly increasing, 0 = embeddings
    num_image_tokens: int  # image tokens per layer after adaptive pooling
    num_text_tokens: int  # instruction tokens per layer (truncated / right-padded, masked)
    width: int  # hidden size D of the backbone
    dtype: str = "float32"  # dtype on the wire and into the head
    image_size: int = 0  # [px] side of the square frame the backbone sees; 0 = its default (heads before 2026-11-26)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("FeatureContract.layers must name at least one layer")
        if any(not isinstance(l, int) or l < 0 for l in self.layers):
            raise ValueError(f"FeatureContract.layers must be non-negative ints, got {self.layers}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"FeatureContract.layers must be strictly increasing, got {self.layers}")
        if self.num_image_tokens < 1 or self.num_text_tokens < 1:
            raise ValueError(
                f"FeatureContract token counts must be >= 1, got image={self.num_image_tokens} text={self.num_text_tokens}"
            )
        if self.width < 1:
            raise ValueError(f"FeatureContract.width must be >= 1, got {self.width}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"FeatureContract.dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.image_size, int) or self.image_size < 0:
            raise ValueError(f"FeatureContract.image_size must be an int >= 0 (0 = the backbone's default), "
                             f"got {self.image_size!r}")

    @property
    def num_tokens(self) -> int:
        return self.num_image_tokens + self.num_text_tokens

    @property
    def deepest_layer(self) -> int:
        return max(self.layers)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layers, tokens, width) of one observation's features."""
        return (len(self.layers), self.num_tokens, self.width)


@dataclass
class FeatureBundle:
    """Per-layer hidden states for one (image, instruction) observation.

    ``hidden`` is (n_layers, T, D) with T = num_image_tokens + num_text_tokens, image tokens
    first; ``mask`` is (T,) bool, False on text padding.
    """

    hidden: torch.Tensor  # (n_layers, T, D)
    mask: torch.Tensor  # (T,) bool
    contract: FeatureContract
    backbone_id: str = ""
    instruction: str = ""
    image_digest: str = ""  # sha1 of the raw image bytes, for provenance and caching
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.hidden.shape) != self.contract.shape:
            raise ValueError(f"FeatureBundle.hidden shape {tuple(self.hidden.shape)} != contract {self.contract.shape}")
        if tuple(self.mask.shape) != (self.contract.num_tokens,):
            raise ValueError(f"FeatureBundle.mask shape {tuple(self.mask.shape)} != ({self.contract.num_tokens},)")

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(hidden float32 (n_layers, T, D), mask bool (T,)) for onnxruntime or a ROS message."""
        return self.hidden.float().cpu().numpy(), self.mask.cpu().numpy().astype(bool)
