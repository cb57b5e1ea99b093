"""Configs of the actions-as-text baseline (VLM2VLA-style): codec, LoRA, training.

Saved as ``text_policy.json`` beside ``adapter.safetensors`` (LoRA weights only: the base
VLM is the shipped backbone, identified by id + weights digest and never modified on disk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_BINS = 100  # every value is written as exactly two decimal digits ("00".."99")
TEXT_POLICY_FORMAT_VERSION = 1
DEFAULT_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class ActionTextConfig:
    """How a chunk of joint targets becomes text: per-dimension uniform bins of the delta to the
    current joint state, two digits per value, one word per waypoint (e.g. ``"4951...50 5052...49"``).
    The state is written the same way (absolute, its own ranges) into the prompt."""

    chunk_len: int  # H waypoints written per chunk
    action_low: tuple[float, ...]  # per dim: lowest representable delta (action - state)
    action_high: tuple[float, ...]
    state_low: tuple[float, ...]
    state_high: tuple[float, ...]
    num_bins: int = MAX_BINS

    def __post_init__(self) -> None:
        if self.chunk_len < 1:
            raise ValueError(f"ActionTextConfig.chunk_len must be >= 1, got {self.chunk_len}")
        if not 2 <= self.num_bins <= MAX_BINS:
            raise ValueError(f"ActionTextConfig.num_bins must be in [2, {MAX_BINS}], got {self.num_bins}")
        for lo_name, hi_name in (("action_low", "action_high"), ("state_low", "state_high")):
            lo, hi = getattr(self, lo_name), getattr(self, hi_name)
            if not lo or len(lo) != len(hi):
                raise ValueError(f"ActionTextConfig.{lo_name}/{hi_name} must be non-empty and equally long, got {lo}/{hi}")
            if any(not h > l for l, h in zip(lo, hi)):
                raise ValueError(f"ActionTextConfig.{hi_name} must exceed {lo_name} in every dimension, got {lo}/{hi}")

    @property
    def action_dim(self) -> int:
        return len(self.action_low)

    @property
    def state_dim(self) -> int:
        return len(self.state_low)


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = DEFAULT_LORA_TARGETS  # regex over module names: the language model's linear layers

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.alpha > 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings rank >= 1, alpha > 0, dropout in [0, 1) required, got "
                             f"{self.rank}/{self.alpha}/{self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraSettings.target_modules must not be empty")


@dataclass
class TextPolicyConfig:
    codec: ActionTextConfig
    backbone_id: str
    backbone_digest: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    dt_s: float = 0.1  # [s] between waypoints
    format_version: int = TEXT_POLICY_FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.dt_s > 0:
            raise ValueError(f"TextPolicyConfig.dt_s must be > 0, got {self.dt_s}")
        if self.format_version != TEXT_POLICY_FORMAT_VERSION:
            raise ValueError(f"TextPolicyConfig.format_version {self.format_version} unsupported")


@dataclass
class TextTrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    chunk_len: int = 4
    seed: int = 0
    range_quantile: float = 0.01  # bins span the [q, 1 - q] quantiles of the training deltas (widened 10 %)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.chunk_len < 1:
            raise ValueError(f"TextTrainConfig steps/batch_size/chunk_len must be >= 1, got "
                             f"{self.steps}/{self.batch_size}/{self.chunk_len}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"TextTrainConfig lr > 0 and weight_decay >= 0 required, got {self.lr}/{self.weight_decay}")
        if not 0.0 <= self.range_quantile < 0.5:
            raise ValueError(f"TextTrainConfig.range_quantile must be in [0, 0.5), got {self.range_quantile}")
