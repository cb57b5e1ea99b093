"""Configuration of the retrieval Meta Skill Module (MSM) and its skill memory."""

from __future__ import annotations

from dataclasses import dataclass

from m2vla_core.heads.skills.basis import BASIS_KINDS


@dataclass
class MSMConfig:
    memory_size: int = 2048  # capacity; larger training sets are subsampled evenly in (episode, time)
    top_k: int = 4  # retrieved entries per query (L1 nearest keys)
    key_layer: int = -1  # hidden-state index pooled into the key; -1 = the deepest listed layer
    key_state_weight: float = 1.0  # share of the state part in the L1 key distance (features part = 1)
    num_action_tokens: int = 4  # learned action-latent tokens refined by cross-attention
    num_blocks: int = 2
    num_heads: int = 4
    smooth_decode: bool = True  # decode through the fixed smooth basis (chunks smooth by construction)
    basis: str = "dct"
    num_basis: int = 6  # N_b coefficients per action dimension (<< chunk_len)
    residual_over_prior: bool = True  # output = distance-weighted retrieved chunk + learned correction
    prior_temperature: float = 0.1  # initial softmax temperature over retrieved L1 distances (learned)
    exclude_same_episode: bool = True  # in training, never retrieve the query's own episode

    def __post_init__(self) -> None:
        for name in ("memory_size", "top_k", "num_action_tokens", "num_blocks", "num_heads", "num_basis"):
            if getattr(self, name) < 1:
                raise ValueError(f"MSMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.memory_size:
            raise ValueError(f"MSMConfig.top_k={self.top_k} exceeds memory_size={self.memory_size}")
        if self.key_layer < -1:
            raise ValueError(f"MSMConfig.key_layer must be a hidden-state index or -1, got {self.key_layer}")
        if self.key_state_weight < 0:
            raise ValueError(f"MSMConfig.key_state_weight must be >= 0, got {self.key_state_weight}")
        if self.basis not in BASIS_KINDS:
            raise ValueError(f"MSMConfig.basis must be one of {BASIS_KINDS}, got {self.basis!r}")
        if not self.prior_temperature > 0:
            raise ValueError(f"MSMConfig.prior_temperature must be > 0, got {self.prior_temperature}")
