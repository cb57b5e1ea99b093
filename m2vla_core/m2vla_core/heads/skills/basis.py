"""Fixed smooth temporal bases for action chunks (DCT-II or clamped cubic B-splines).

A chunk of H steps is written as ``B @ C`` with ``B`` (H, N_b) fixed and ``C`` (N_b, A)
predicted; with N_b << H the chunk cannot contain high-frequency jitter, whatever the network
outputs, and decoding is one small matmul that exports to ONNX as a constant.

For the DCT basis the bound is exact: the DCT-II vectors are eigenvectors of the
reflecting-boundary second-difference operator with eigenvalue 4 sin^2(pi k / 2H), so any
chunk in the span of the first N_b vectors satisfies
``||diff2(x)|| <= 4 sin^2(pi (N_b - 1) / 2H) * ||x - mean(x)||`` per action dimension
(``second_difference_bound``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BASIS_KINDS = ("dct", "bspline")


def dct_basis(chunk_len: int, num_basis: int) -> np.ndarray:
    """Orthonormal DCT-II columns, (H, N_b); column 0 is the constant."""
    t = np.arange(chunk_len, dtype=np.float64) + 0.5
    k = np.arange(num_basis, dtype=np.float64)
    basis = np.cos(np.pi * np.outer(t, k) / chunk_len)  # (H, N_b)
    basis[:, 0] *= math.sqrt(1.0 / chunk_len)
    basis[:, 1:] *= math.sqrt(2.0 / chunk_len)
    return basis


def bspline_basis(chunk_len: int, num_basis: int, degree: int = 3) -> np.ndarray:
    """Clamped uniform B-spline basis sampled at H points on [0, 1], (H, N_b); rows sum to 1."""
    if num_basis < degree + 1:
        raise ValueError(f"bspline basis needs num_basis >= degree + 1 = {degree + 1}, got {num_basis}")
    n_inner = num_basis - degree - 1
    knots = np.concatenate([np.zeros(degree), np.linspace(0.0, 1.0, n_inner + 2), np.ones(degree)])  # (N_b + degree + 1,)
    t = np.linspace(0.0, 1.0, chunk_len)
    # Cox-de Boor recursion, degree 0 first; the last sample belongs to the last span.
    basis = np.zeros((chunk_len, len(knots) - 1))
    for i in range(len(knots) - 1):
        basis[:, i] = (knots[i] <= t) & (t < knots[i + 1])
    last_span = np.nonzero(knots[:-1] < knots[1:])[0][-1]
    basis[t >= 1.0, :] = 0.0
    basis[t >= 1.0, last_span] = 1.0
    for p in range(1, degree + 1):
        nxt = np.zeros((chunk_len, len(knots) - 1 - p))
        for i in range(len(knots) - 1 - p):
            left_den = knots[i + p] - knots[i]
            right_den = knots[i + p + 1] - knots[i + 1]
            left = (t - knots[i]) / left_den * basis[:, i] if left_den > 0 else 0.0
            right = (knots[i + p + 1] - t) / right_den * basis[:, i + 1] if right_den > 0 else 0.0
            nxt[:, i] = left + right
        basis = nxt
    return basis  # (H, N_b)


def make_basis(kind: str, chunk_len: int, num_basis: int) -> torch.Tensor:
    """(H, N_b) float32 basis matrix of ``kind`` ("dct" | "bspline")."""
    if kind not in BASIS_KINDS:
        raise ValueError(f"basis kind must be one of {BASIS_KINDS}, got {kind!r}")
    if not 1 <= num_basis <= chunk_len:
        raise ValueError(f"num_basis must be in [1, chunk_len={chunk_len}], got {num_basis}")
    fn = dct_basis if kind == "dct" else bspline_basis
    return torch.from_numpy(fn(chunk_len, num_basis)).float()


def second_difference_bound(chunk_len: int, num_basis: int) -> float:
    """Ratio bound ||diff2(x)|| / ||x - mean(x)|| for x in the span of the first N_b DCT vectors."""
    return 4.0 * math.sin(math.pi * (num_basis - 1) / (2.0 * chunk_len)) ** 2


def ramp_coefficients(basis: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients (N_b,) of a 0 -> 1 ramp over the chunk: the shape of a goal offset."""
    chunk_len = basis.shape[0]
    ramp = torch.linspace(1.0 / chunk_len, 1.0, chunk_len, dtype=torch.float64)  # (H,)
    return (torch.linalg.pinv(basis.double()) @ ramp).float()  # (N_b,)


def smoothness_bound(basis: torch.Tensor | np.ndarray) -> float:
    """Worst-case ||diff2(x)|| / ||x - mean(x)|| over x = basis @ c (any basis; numeric).

    For the DCT basis this equals ``second_difference_bound``; for white noise the ratio is
    about sqrt(6) ~ 2.45, so a small bound means the basis cannot express jitter.
    """
    b = np.asarray(basis, dtype=np.float64)  # (H, N_b)
    h = b.shape[0]
    centred = b - b.mean(axis=0, keepdims=True)  # (H, N_b)
    d2 = b[2:] - 2 * b[1:-1] + b[:-2]  # (H - 2, N_b)
    # Parametrise by z with ||x - mean|| = ||z|| (SVD of the centred basis). Coefficient directions
    # that leave the centred signal unchanged only shift by a constant (both bases span it), which
    # adds no second difference.
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = s > 1e-5 * max(s.max(), 1.0)  # float32 bases: rounding leaves ~1e-7 of the constant
    m = d2 @ vt[keep].T / s[keep]  # (H - 2, k): diff2 as a linear function of z
    return float(np.linalg.norm(m, 2)) if h > 2 else 0.0
