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


def image_token_grid(num_image_tokens: int) -> tuple[int, int]:
    """(rows, cols) of N raster-ordered image tokens: the factor pair closest to square (what the
    backbone adapter pools a square frame to)."""
    rows = min((a for a in range(1, num_image_tokens + 1) if num_image_tokens % a == 0),
               key=lambda a: (abs(math.log(a / (num_image_tokens // a))), a))
    return rows, num_image_tokens // rows


def image_token_xy(num_image_tokens: int) -> torch.Tensor:
    """(N, 2) [0, 1] (row, column) of each image token's cell centre."""
    rows, cols = image_token_grid(num_image_tokens)
    y, x = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
    return torch.stack([y.reshape(-1), x.reshape(-1)], -1)


def image_grid_embedding(num_image_tokens: int, d_model: int) -> torch.Tensor:
    """(N, d) fixed 2-D sine / cosine codes of raster-ordered image tokens on their grid.

    Qwen2-VL's rotary positions leave little absolute position in the hidden states; a head that
    starts from these codes can read *where* an attended token is, as a keypoint.
    """
    rows, cols = image_token_grid(num_image_tokens)
    n_freq = d_model // 4
    if n_freq == 0:
        return torch.zeros(num_image_tokens, d_model)
    # from half a period over the whole grid to one period per four tokens (at two, the cosine
    # of every cell centre is 0: the code would alias to a constant)
    freqs = math.pi * torch.logspace(0, math.log2(max(1.0, max(rows, cols) / 2)), n_freq, base=2.0)  # (F,)
    angles = image_token_xy(num_image_tokens)[:, :, None] * freqs  # (N, 2, F)
    codes = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(num_image_tokens, 4 * n_freq)  # (N, 4F)
    return torch.nn.functional.pad(codes, (0, d_model - 4 * n_freq))  # (N, d)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each token to unit RMS over the width (no learned gain)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of x (B, T, D) where mask (B, T) is True -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
