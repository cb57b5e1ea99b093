"""Smooth-basis meta-skills: K learned trajectory templates in a fixed smooth basis, mixed by
predicted weights (soft or top-k), each modulated by an amplitude and a goal offset (a ramp
over the chunk), plus a small residual in the same basis. Decoding is the fixed linear map
``basis @ coeffs`` so every chunk is smooth by construction and costs one small matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from m2vla_core.heads.layers import MASK_FILL, mlp
from m2vla_core.heads.skills.basis import make_basis, ramp_coefficients
from m2vla_core.heads.skills.configuration_skills import SkillsConfig


class SmoothSkillDecoder(nn.Module):
    def __init__(self, config: SkillsConfig, *, d_in: int, chunk_len: int, action_dim: int) -> None:
        super().__init__()
        self.config = config
        k, nb, a = config.num_skills, config.num_basis, action_dim
        self.action_dim = action_dim
        basis = make_basis(config.basis, chunk_len, nb)  # (H, N_b)
        self.register_buffer("basis", basis)
        self.register_buffer("ramp", ramp_coefficients(basis))  # (N_b,)
        self.templates = nn.Parameter(torch.randn(k, nb, a) * 0.5)  # (K, N_b, A)
        # per sample: skill logits (K), amplitudes (K), goal offsets (K * A), residual (N_b * A)
        self.split = (k, k, k * a, nb * a)
        self.trunk = mlp(d_in, config.hidden, sum(self.split), num_layers=3)

    def skill_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits -> weights summing to 1 (zero outside the top-k when top_k > 0)."""
        if self.config.top_k:
            kth = torch.topk(logits, self.config.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, MASK_FILL)
        return torch.softmax(logits, dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, d_in) -> normalised chunk (B, H, A)."""
        logits, amp, offset, residual = torch.split(self.trunk(h), self.split, dim=-1)
        w = self.skill_weights(logits)  # (B, K)
        amp = 1.0 + amp  # (B, K), starts near 1
        offset = offset.unflatten(-1, (self.config.num_skills, self.action_dim))  # (B, K, A)
        coeffs = torch.einsum("bk,kna->bna", w * amp, self.templates)  # (B, N_b, A)
        coeffs = coeffs + self.ramp[None, :, None] * torch.einsum("bk,bka->ba", w, offset)[:, None, :]
        residual = residual.unflatten(-1, (self.config.num_basis, self.action_dim))  # (B, N_b, A)
        coeffs = coeffs + self.config.residual_scale * residual
        return self.basis @ coeffs  # (B, H, A)
