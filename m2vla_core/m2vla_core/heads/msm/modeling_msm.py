"""Meta Skill Module: a retrieval memory of demonstration action chunks + a cross-attention
decoder that refines the action latent with the retrieved skills.

Memory (as in the paper): keys are perceptual features, values the successful future action
chunks (normalised) of the training demonstrations. Our key is *parameter-free* so it stays
fixed while the head trains and the memory never has to be rebuilt:

    key = [ masked-mean over tokens of RMS-normalised hidden states of ``key_layer`` / D ,
            key_state_weight * normalised state / S ]

so the L1 distance is (mean |feature difference|) + key_state_weight * (mean |state
difference|). Retrieval takes the top-k (default 4) smallest L1 distances. During training
entries of the query's own episode are excluded (``exclude_same_episode``) so the decoder
learns to adapt neighbours instead of copying its own answer.

Decoding: learned action tokens (plus the state) cross-attend to [MoL latent ; retrieved
chunk tokens with their distances]; the output is a set of smooth-basis coefficients
(``smooth_decode``), optionally added to the distance-weighted retrieved prior projected onto
the same basis, so the final chunk is always in the smooth span.

Bounded size: ``memory_size`` entries at most; a larger training set is subsampled at
evenly spaced positions of its (episode, time)-ordered sample list (``subsample_indices``),
which keeps every part of every episode proportionally.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from m2vla_core.heads.layers import CrossBlock, masked_mean, rms_normalize
from m2vla_core.heads.msm.configuration_msm import MSMConfig
from m2vla_core.heads.skills.basis import make_basis

EXCLUDED_DISTANCE = 1e9


def subsample_indices(episode_index: np.ndarray, capacity: int) -> np.ndarray:
    """Indices of at most ``capacity`` samples, evenly spaced over the (episode, time) order."""
    order = np.argsort(np.asarray(episode_index), kind="stable")  # time order kept inside an episode
    if len(order) <= capacity:
        return order
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, capacity)).astype(np.int64))
    return order[picks]


def memory_key(features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor, *, key_pos: int,
               state_weight: float, eps: float = 1e-6) -> torch.Tensor:
    """Fixed retrieval key (B, D + S) from features (B, L, T, D), mask (B, T), normalised state (B, S)."""
    pooled = masked_mean(rms_normalize(features[:, key_pos], eps), mask)  # (B, D)
    return torch.cat([pooled / pooled.shape[-1], state_n * (state_weight / state_n.shape[-1])], dim=-1)


class SkillMemory(nn.Module):
    """Keys (M, K), normalised action chunks (M, H, A) and their episode ids (M,), as buffers.

    Buffers start empty and take the size found in a checkpoint (at most ``capacity``), so
    the memory is saved in model.safetensors and exported to ONNX as constants.
    """

    def __init__(self, capacity: int, key_dim: int, chunk_len: int, action_dim: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.register_buffer("keys", torch.zeros(0, key_dim))
        self.register_buffer("values", torch.zeros(0, chunk_len, action_dim))
        self.register_buffer("episodes", torch.zeros(0, dtype=torch.int64))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def set(self, keys: torch.Tensor, values: torch.Tensor, episodes: torch.Tensor) -> None:
        if keys.shape[0] > self.capacity:
            raise ValueError(f"skill memory: {keys.shape[0]} entries exceed capacity {self.capacity}")
        if keys.shape[1:] != self.keys.shape[1:] or values.shape[1:] != self.values.shape[1:]:
            raise ValueError(f"skill memory: entries shaped {tuple(keys.shape)}/{tuple(values.shape)}, expected "
                             f"(M, {self.keys.shape[1]})/(M, {self.values.shape[1]}, {self.values.shape[2]})")
        self.keys = keys.detach().float().contiguous()
        self.values = values.detach().float().contiguous()
        self.episodes = episodes.detach().to(torch.int64).contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Adopt the stored number of entries (trailing dims must still match; checked by the caller).
        for name in ("keys", "values", "episodes"):
            stored = state_dict.get(prefix + name)
            current = getattr(self, name)
            if stored is not None and stored.shape[1:] == current.shape[1:] and stored.shape[0] <= self.capacity:
                setattr(self, name, torch.empty_like(stored, dtype=current.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def query(self, key: torch.Tensor, k: int, exclude_episode: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k by L1 -> values (B, k, H, A), distances (B, k), entry indices (B, k)."""
        if self.size < k:
            raise RuntimeError(f"skill memory holds {self.size} entries, fewer than top_k={k}: build_memory first")
        dist = (key[:, None, :] - self.keys[None, :, :]).abs().sum(dim=-1)  # (B, M)
        if exclude_episode is not None:
            dist = dist + (self.episodes[None, :] == exclude_episode[:, None]).to(dist.dtype) * EXCLUDED_DISTANCE
        neg, idx = torch.topk(-dist, k, dim=-1)  # (B, k), nearest first
        return self.values[idx], -neg, idx


class MetaSkillModule(nn.Module):
    def __init__(self, config: MSMConfig, *, d_model: int, state_dim: int, chunk_len: int, action_dim: int,
                 key_dim: int) -> None:
        super().__init__()
        self.config = config
        self.chunk_len, self.action_dim = chunk_len, action_dim
        self.memory = SkillMemory(config.memory_size, key_dim, chunk_len, action_dim)
        self.retrieved_proj = nn.Linear(chunk_len * action_dim, d_model)
        self.distance_proj = nn.Linear(1, d_model)
        self.rank_embed = nn.Parameter(torch.randn(config.top_k, d_model) * 0.02)
        self.action_tokens = nn.Parameter(torch.randn(config.num_action_tokens, d_model) * 0.02)
        self.state_proj = nn.Linear(state_dim, d_model)
        self.blocks = nn.ModuleList(CrossBlock(d_model, config.num_heads) for _ in range(config.num_blocks))
        self.out_norm = nn.LayerNorm(d_model)
        n_out = (config.num_basis if config.smooth_decode else chunk_len) * action_dim
        self.out = nn.Linear(config.num_action_tokens * d_model, n_out)
        if config.residual_over_prior:  # start as "return the retrieved prior"
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.log_temperature = nn.Parameter(torch.tensor(float(np.log(config.prior_temperature))))
        if config.smooth_decode:
            basis = make_basis(config.basis, chunk_len, config.num_basis)  # (H, N_b)
            self.register_buffer("basis", basis)
            self.register_buffer("basis_pinv", torch.linalg.pinv(basis.double()).float())  # (N_b, H)

    def forward(self, latent: torch.Tensor, state_n: torch.Tensor, key: torch.Tensor,
                exclude_episode: torch.Tensor | None = None) -> torch.Tensor:
        """latent (B, Q + keypoints, d), state_n (B, S), key (B, K) -> normalised chunk (B, H, A)."""
        cfg = self.config
        retrieved, dist, _ = self.memory.query(key, cfg.top_k, exclude_episode)  # (B, k, H, A), (B, k)
        ret_tokens = self.retrieved_proj(retrieved.flatten(2)) + self.distance_proj(dist[..., None]) + self.rank_embed  # (B, k, d)
        ctx = torch.cat([latent, ret_tokens], dim=1)  # (B, Q + k, d)
        x = self.action_tokens.expand(latent.shape[0], -1, -1) + self.state_proj(state_n)[:, None, :]  # (B, Na, d)
        for block in self.blocks:
            x = block(x, ctx)
        out = self.out(self.out_norm(x).flatten(1))  # (B, Na * d) -> (B, N_b * A) or (B, H * A)
        if cfg.residual_over_prior:
            w = torch.softmax(-dist / self.log_temperature.exp(), dim=-1)  # (B, k)
            prior = (w[:, :, None, None] * retrieved).sum(dim=1)  # (B, H, A)
        if cfg.smooth_decode:
            coeffs = out.unflatten(-1, (cfg.num_basis, self.action_dim))  # (B, N_b, A)
            if cfg.residual_over_prior:
                coeffs = coeffs + self.basis_pinv @ prior  # prior projected onto the smooth span
            return self.basis @ coeffs  # (B, H, A)
        chunk = out.unflatten(-1, (self.chunk_len, self.action_dim))  # (B, H, A)
        return chunk + prior if cfg.residual_over_prior else chunk
