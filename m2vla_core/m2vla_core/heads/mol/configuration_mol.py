"""Configuration of the Mixture of Layers (MoL): how the VLM's per-layer hidden states are mixed."""

from __future__ import annotations

from dataclasses import dataclass

MIX_MODES = ("last", "fixed", "uniform", "scalar", "router")
TOKEN_POS_INITS = ("random", "grid")
FEATURE_NORMS = ("rms", "standardize")


@dataclass
class MoLConfig:
    # last: only the deepest listed layer; fixed: one given layer; uniform: plain average;
    # scalar: static learned softmax mix; router: input-conditioned softmax (optionally top-k).
    mix: str = "router"
    fixed_layer: int = -1  # hidden-state index read by mix="fixed"; -1 = the middle listed layer
    top_k: int = 0  # router only: read just the k best layers per sample; 0 = dense softmax
    router_layer: int = -1  # hidden-state index the router pools; -1 = the shallowest listed layer
    router_hidden: int = 64
    num_queries: int = 8  # learned queries -> compact latent (B, num_queries, d_model)
    num_heads: int = 4
    eps: float = 1e-6  # RMS norm epsilon
    # How each layer's tokens are scaled before the mix. rms: each token by its own RMS (scale-free,
    # keeps what all tokens share); standardize: each feature dimension by the training split's
    # mean and std over tokens (``MixtureOfLayers.set_feature_stats``), as the probe does: it
    # removes the component every token shares, which in an untrained backbone can dwarf what
    # tells one place from another.
    feature_norm: str = "rms"
    # How the learned token positions start. random: small noise; grid: the image tokens start at
    # 2-D sine / cosine codes of their place in the token grid (``image_grid_embedding``), so the
    # queries' attention can carry where an object is. Training moves them either way.
    token_pos_init: str = "random"
    # Instruction-conditioned spatial keypoints: a per-token scorer (reading the image token and
    # the instruction) gives a softmax over the image grid per keypoint; its expected (row, col)
    # joins the latent as one more token. This is where a head can say *where* the named object
    # is, to a fraction of a token. 0 = none.
    num_keypoints: int = 0
    keypoint_hidden: int = 64

    def __post_init__(self) -> None:
        if self.mix not in MIX_MODES:
            raise ValueError(f"MoLConfig.mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.top_k < 0:
            raise ValueError(f"MoLConfig.top_k must be >= 0, got {self.top_k}")
        if self.top_k and self.mix != "router":
            raise ValueError(f"MoLConfig.top_k={self.top_k} needs mix='router', got mix={self.mix!r}")
        if self.fixed_layer < -1:
            raise ValueError(f"MoLConfig.fixed_layer must be a hidden-state index or -1, got {self.fixed_layer}")
        if self.router_layer < -1:
            raise ValueError(f"MoLConfig.router_layer must be a hidden-state index or -1, got {self.router_layer}")
        if self.num_keypoints < 0:
            raise ValueError(f"MoLConfig.num_keypoints must be >= 0, got {self.num_keypoints}")
        for name in ("router_hidden", "num_queries", "num_heads", "keypoint_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.token_pos_init not in TOKEN_POS_INITS:
            raise ValueError(f"MoLConfig.token_pos_init must be one of {TOKEN_POS_INITS}, got {self.token_pos_init!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"MoLConfig.feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if not self.eps > 0:
            raise ValueError(f"MoLConfig.eps must be > 0, got {self.eps}")
