"""Mixture of Layers: per-layer RMS norm, a layer mix (fixed, static or routed), then learned
queries cross-attend to the mixed tokens and give a compact latent.

With ``mix="router"`` and ``top_k=k`` only k layers per sample are gathered from the input
(the others are never read, so they get no gradient and cannot change the output); the
router itself looks only at one designated cheap layer (``router_layer``) plus the state.
``layer_weights`` is dense (B, n_layers) over the contract layers and sums to 1.
"""

from __future__ import annotations

import torch
from torch import nn

from m2vla_core.features import FeatureContract
from m2vla_core.heads.layers import CrossBlock, image_grid_embedding, masked_mean, mlp, rms_normalize
from m2vla_core.heads.mol.configuration_mol import MoLConfig


class MixtureOfLayers(nn.Module):
    def __init__(self, config: MoLConfig, contract: FeatureContract, state_dim: int, d_model: int,
                 *, fixed_pos: int, router_pos: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers = len(contract.layers)
        self.fixed_pos = fixed_pos  # position read by mix="fixed"
        self.router_pos = router_pos
        self.layer_gain = nn.Parameter(torch.ones(self.num_layers, contract.width))  # per-layer RMS norm gain
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

    def _norm(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.config.eps) * gain

    def _mix(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mixed tokens (B, T, D) and dense layer weights (B, n_layers)."""
        batch, n_layers = features.shape[0], self.num_layers
        mode = self.config.mix
        if mode in ("last", "fixed"):
            pos = n_layers - 1 if mode == "last" else self.fixed_pos
            weights = torch.zeros(n_layers, dtype=features.dtype, device=features.device)
            weights[pos] = 1.0
            return self._norm(features[:, pos], self.layer_gain[pos]), weights.expand(batch, n_layers)  # (B, L)
        if mode in ("uniform", "scalar"):
            if mode == "uniform":
                w = torch.full((n_layers,), 1.0 / n_layers, dtype=features.dtype, device=features.device)
            else:
                w = torch.softmax(self.mix_logits, dim=0)
            normed = self._norm(features, self.layer_gain[:, None, :])  # (B, L, T, D)
            mixed = (normed * w[None, :, None, None]).sum(dim=1)  # (B, T, D)
            return mixed, w.expand(batch, n_layers)  # (B, T, D), (B, L)
        summary = masked_mean(rms_normalize(features[:, self.router_pos], self.config.eps), mask)  # (B, D)
        logits = self.router(torch.cat([summary, state_n], dim=-1))  # (B, L)
        if not self.config.top_k:
            w = torch.softmax(logits, dim=-1)  # (B, L)
            normed = self._norm(features, self.layer_gain[:, None, :])  # (B, L, T, D)
            return (normed * w[:, :, None, None]).sum(dim=1), w
        top_logits, top_idx = torch.topk(logits, self.config.top_k, dim=-1)  # (B, k)
        w_top = torch.softmax(top_logits, dim=-1)  # (B, k)
        _, _, tokens, width = features.shape
        gather_idx = top_idx[:, :, None, None].expand(-1, -1, tokens, width)  # (B, k, T, D)
        picked = torch.gather(features, 1, gather_idx)  # (B, k, T, D): only these layers are read
        gains = self.layer_gain[top_idx]  # (B, k, D)
        normed = self._norm(picked, gains[:, :, None, :])  # (B, k, T, D)
        mixed = (normed * w_top[:, :, None, None]).sum(dim=1)  # (B, T, D)
        dense = torch.zeros_like(logits).scatter(1, top_idx, w_top)  # (B, L), zeros off the top-k
        return mixed, dense

    def layer_weights(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> torch.Tensor:
        """Dense mixing weights (B, n_layers) over the contract layers; rows sum to 1."""
        return self._mix(features, mask, state_n)[1]

    def forward(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, L, T, D), mask (B, T) bool, normalised state (B, S) -> latent (B, Q, d), weights (B, L)."""
        mixed, weights = self._mix(features, mask, state_n)
        tokens = self.in_proj(mixed) + self.token_pos  # (B, T, d)
        queries = self.queries.expand(features.shape[0], -1, -1)  # (B, Q, d)
        latent = self.block(queries, tokens, mask)  # (B, Q, d)
        return latent, weights
