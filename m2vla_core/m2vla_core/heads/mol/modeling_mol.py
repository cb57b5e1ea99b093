"""Mixture of Layers: per-layer norm (RMS, or standardised by training statistics), a layer mix
(fixed, static or routed), then learned queries cross-attend to the mixed tokens and give a
compact latent (plus, optionally, one token per instruction-conditioned spatial keypoint:
``SpatialKeypoints``).

With ``mix="router"`` and ``top_k=k`` only k layers per sample are gathered from the input
(the others are never read, so they get no gradient and cannot change the output); the
router itself looks only at one designated cheap layer (``router_layer``) plus the state.
``layer_weights`` is dense (B, n_layers) over the contract layers and sums to 1.
"""

from __future__ import annotations

import torch
from torch import nn

from m2vla_core.features import FeatureContract
from m2vla_core.heads.layers import (MASK_FILL, CrossBlock, image_grid_embedding, image_token_xy, masked_mean, mlp,
                                     rms_normalize)
from m2vla_core.heads.mol.configuration_mol import MoLConfig


class SpatialKeypoints(nn.Module):
    """Image tokens + instruction -> K keypoints: a spatial softmax over the token grid each.

    A shared MLP scores every image token from its features and the instruction's mean token,
    so the same weights find "the red cube" or "the blue cube" as the instruction says. The
    expected cell centre under each softmax is a position finer than the token grid.
    """

    def __init__(self, d_model: int, num_keypoints: int, hidden: int, num_image_tokens: int) -> None:
        super().__init__()
        self.num_image_tokens = num_image_tokens
        self.score = mlp(2 * d_model, hidden, num_keypoints)
        self.embed = nn.Linear(2, d_model)
        self.identity = nn.Parameter(torch.randn(num_keypoints, d_model) * 0.02)
        self.register_buffer("token_xy", image_token_xy(num_image_tokens), persistent=False)  # (N, 2)

    def positions(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, d) image first, mask (B, T) -> (B, K, 2) expected (row, col) in [0, 1]."""
        n = self.num_image_tokens
        instruction = masked_mean(tokens[:, n:], mask[:, n:])  # (B, d)
        image = tokens[:, :n]  # (B, N, d)
        scores = self.score(torch.cat([image, instruction[:, None, :].expand_as(image)], dim=-1))  # (B, N, K)
        scores = scores.masked_fill(~mask[:, :n, None], MASK_FILL)
        return torch.softmax(scores, dim=1).transpose(1, 2) @ self.token_xy  # (B, K, 2)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-> (B, K, d) one latent token per keypoint: its position, and which keypoint it is."""
        return self.embed(self.positions(tokens, mask) * 2.0 - 1.0) + self.identity


class MixtureOfLayers(nn.Module):
    def __init__(self, config: MoLConfig, contract: FeatureContract, state_dim: int, d_model: int,
                 *, fixed_pos: int, router_pos: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers = len(contract.layers)
        self.fixed_pos = fixed_pos  # position read by mix="fixed"
        self.router_pos = router_pos
        self.layer_gain = nn.Parameter(torch.ones(self.num_layers, contract.width))  # per-layer norm gain
        if config.feature_norm == "standardize":  # set from the training split; saved with the head
            self.register_buffer("feature_mean", torch.zeros(self.num_layers, contract.width))
            self.register_buffer("feature_std", torch.ones(self.num_layers, contract.width))
        if config.mix == "scalar":
            self.mix_logits = nn.Parameter(torch.zeros(self.num_layers))
        if config.mix == "router":
            self.router = mlp(contract.width + state_dim, config.router_hidden, self.num_layers)
        self.in_proj = nn.Linear(contract.width, d_model)
        self.token_pos = nn.Parameter(torch.randn(contract.num_tokens, d_model) * 0.02)
        if config.token_pos_init == "grid":
            with torch.no_grad():
                self.token_pos[:contract.num_image_tokens] = image_grid_embedding(contract.num_image_tokens, d_model)
        self.queries = nn.Parameter(torch.randn(config.num_queries, d_model) * 0.02)
        self.block = CrossBlock(d_model, config.num_heads)
        self.keypoints = (SpatialKeypoints(d_model, config.num_keypoints, config.keypoint_hidden,
                                           contract.num_image_tokens) if config.num_keypoints else None)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per layer and dimension (n_layers, D) mean and std of the features (feature_norm="standardize")."""
        if self.config.feature_norm != "standardize":
            raise RuntimeError(f"feature statistics are for feature_norm='standardize', not {self.config.feature_norm!r}")
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(f"feature stats shaped {tuple(mean.shape)}, {tuple(std.shape)}; "
                             f"expected {tuple(self.feature_mean.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("feature stats must be finite with std > 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def _scale(self, x: torch.Tensor, layer) -> torch.Tensor:
        """x (..., T, D) of the layers ``layer`` indexes (an int, a slice or a (B, k) tensor)."""
        if self.config.feature_norm == "standardize":
            return (x - self.feature_mean[layer].unsqueeze(-2)) / self.feature_std[layer].unsqueeze(-2)
        return rms_normalize(x, self.config.eps)

    def _norm(self, x: torch.Tensor, layer) -> torch.Tensor:
        return self._scale(x, layer) * self.layer_gain[layer].unsqueeze(-2)

    def _mix(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mixed tokens (B, T, D) and dense layer weights (B, n_layers)."""
        batch, n_layers = features.shape[0], self.num_layers
        mode = self.config.mix
        if mode in ("last", "fixed"):
            pos = n_layers - 1 if mode == "last" else self.fixed_pos
            weights = torch.zeros(n_layers, dtype=features.dtype, device=features.device)
            weights[pos] = 1.0
            return self._norm(features[:, pos], pos), weights.expand(batch, n_layers)  # (B, T, D), (B, L)
        if mode in ("uniform", "scalar"):
            if mode == "uniform":
                w = torch.full((n_layers,), 1.0 / n_layers, dtype=features.dtype, device=features.device)
            else:
                w = torch.softmax(self.mix_logits, dim=0)
            normed = self._norm(features, slice(None))  # (B, L, T, D)
            mixed = (normed * w[None, :, None, None]).sum(dim=1)  # (B, T, D)
            return mixed, w.expand(batch, n_layers)  # (B, T, D), (B, L)
        summary = masked_mean(self._scale(features[:, self.router_pos], self.router_pos), mask)  # (B, D)
        logits = self.router(torch.cat([summary, state_n], dim=-1))  # (B, L)
        if not self.config.top_k:
            w = torch.softmax(logits, dim=-1)  # (B, L)
            normed = self._norm(features, slice(None))  # (B, L, T, D)
            return (normed * w[:, :, None, None]).sum(dim=1), w
        top_logits, top_idx = torch.topk(logits, self.config.top_k, dim=-1)  # (B, k)
        w_top = torch.softmax(top_logits, dim=-1)  # (B, k)
        _, _, tokens, width = features.shape
        gather_idx = top_idx[:, :, None, None].expand(-1, -1, tokens, width)  # (B, k, T, D)
        picked = torch.gather(features, 1, gather_idx)  # (B, k, T, D): only these layers are read
        normed = self._norm(picked, top_idx)  # (B, k, T, D)
        mixed = (normed * w_top[:, :, None, None]).sum(dim=1)  # (B, T, D)
        dense = torch.zeros_like(logits).scatter(1, top_idx, w_top)  # (B, L), zeros off the top-k
        return mixed, dense

    def layer_weights(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> torch.Tensor:
        """Dense mixing weights (B, n_layers) over the contract layers; rows sum to 1."""
        return self._mix(features, mask, state_n)[1]

    def forward(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, L, T, D), mask (B, T) bool, normalised state (B, S) -> latent (B, Q + K, d), weights (B, L)."""
        mixed, weights = self._mix(features, mask, state_n)
        projected = self.in_proj(mixed)  # (B, T, d)
        tokens = projected + self.token_pos  # (B, T, d)
        queries = self.queries.expand(features.shape[0], -1, -1)  # (B, Q, d)
        latent = self.block(queries, tokens, mask)  # (B, Q, d)
        if self.keypoints is not None:
            latent = torch.cat([latent, self.keypoints(projected, mask)], dim=1)  # (B, Q + K, d)
        return latent, weights

    @property
    def latent_tokens(self) -> int:
        """Q + K: rows of the latent."""
        return self.config.num_queries + self.config.num_keypoints
