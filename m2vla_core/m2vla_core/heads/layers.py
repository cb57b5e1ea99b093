"""Small building blocks shared by the head parts, written out so ONNX export stays plain
(matmul + softmax, no fused kernels whose export paths change between torch releases)."""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_FILL = -1e9  # finite, so a fully masked row yields a uniform softmax instead of NaN


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Nq, d) attends to ctx (B, Nk, d); key_mask (B, Nk) bool, False = ignore."""
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, h, Nq, hd)
        k, v = self.kv(ctx).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Nk, hd)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim))  # (B, h, Nq, Nk)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], MASK_FILL)
        out = torch.softmax(scores, dim=-1) @ v  # (B, h, Nq, hd)
        return self.out(out.transpose(1, 2).flatten(2))  # (B, Nq, d)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention + MLP with residuals."""

    def __init__(self, d_model: int, num_heads: int, ff_mult: int = 2) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(d_model)
        self.norm_ctx = nn.LayerNorm(d_model)
        self.attn = CrossAttention(d_model, num_heads)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(), nn.Linear(ff_mult * d_model, d_model))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_x(x), self.norm_ctx(ctx), key_mask)
        return x + self.ff(self.norm_ff(x))


def mlp(d_in: int, hidden: int, d_out: int, num_layers: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each token to unit RMS over the width (no learned gain)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of x (B, T, D) where mask (B, T) is True -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
