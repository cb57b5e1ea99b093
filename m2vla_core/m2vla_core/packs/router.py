"""Test-time task router: first observation + instruction -> which pack acts (MergeVLA-style).

The router reads the same frozen-backbone features as the heads, pooled to one image vector
and one instruction vector per layer, so it costs microseconds and needs nothing the policy
node does not already receive. It is trained from the packs' own router examples only;
adding a pack retrains this small classifier and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m2vla_core.config_io import save_json
from m2vla_core.heads.checkpoint import (CheckpointError, atomic_save_safetensors, check_safetensors_file,
                                        check_state_matches, load_config_file, read_weights, refuse_pickles)
from m2vla_core.heads.layers import rms_normalize
from m2vla_core.packs.configuration_packs import RouterConfig, RouterTrainConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INSTRUCTIONS_NAME = "instructions.safetensors"  # the packs' training instructions, as unit vectors


def pool_features(hidden, mask, num_image_tokens: int) -> torch.Tensor:
    """hidden (B, L, T, D) + mask (B, T) -> (B, L, 2, D): image-token mean, instruction-token masked mean.

    Unbatched (L, T, D) + (T,) gives (L, 2, D). Padding text tokens never count; an empty
    instruction gives a zero text vector.
    """
    h = torch.as_tensor(np.asarray(hidden) if not isinstance(hidden, torch.Tensor) else hidden).float()
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    single = h.dim() == 3
    if single:
        h, m = h.unsqueeze(0), m.unsqueeze(0)  # (1, L, T, D), (1, T)
    if h.dim() != 4 or m.shape != (h.shape[0], h.shape[2]):
        raise ValueError(f"pool_features: hidden (B, L, T, D) and mask (B, T) expected, got {tuple(h.shape)} / {tuple(m.shape)}")
    n = int(num_image_tokens)
    if not 0 < n < h.shape[2]:
        raise ValueError(f"pool_features: num_image_tokens={n} must be in (0, T={h.shape[2]})")
    image = h[:, :, :n].mean(dim=2)  # (B, L, D)
    tm = m[:, n:].float()  # (B, Tt)
    text = (h[:, :, n:] * tm[:, None, :, None]).sum(dim=2) / tm.sum(-1).clamp(min=1.0)[:, None, None]  # (B, L, D)
    pooled = torch.stack([image, text], dim=2)  # (B, L, 2, D)
    return pooled[0] if single else pooled


def instruction_vectors(pooled: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pooled (B, L, 2, D) -> (B, L * D) unit vectors of the instruction alone.

    The instruction precedes the frame in the backbone's sequence, so under causal attention
    these do not depend on the image: one vector per distinct instruction text.
    """
    text = rms_normalize(pooled[:, :, 1].float(), eps)  # (B, L, D): every layer counts the same
    flat = text.flatten(1)
    return flat / flat.norm(dim=-1, keepdim=True).clamp(min=eps)


def unique_rows(x: torch.Tensor, decimals: int = 5) -> torch.Tensor:
    """Distinct rows of (N, K) up to rounding (the same instruction seen in many episodes)."""
    _, index = np.unique(np.round(x.numpy(), decimals), axis=0, return_index=True)
    return x[np.sort(index)]


def leave_one_out_similarity(bank: torch.Tensor) -> np.ndarray:
    """(M,) cosine similarity of each bank vector to its nearest *other* one."""
    if len(bank) < 2:
        return np.ones(len(bank))
    sims = bank @ bank.T
    sims.fill_diagonal_(-1.0)
    return sims.max(dim=1).values.numpy()


def save_instruction_bank(bank: torch.Tensor, directory: str | os.PathLike) -> None:
    atomic_save_safetensors({"vectors": bank.contiguous().float()}, Path(directory) / INSTRUCTIONS_NAME,
                            {"format": "m2vla-instruction-bank", "version": "1"})


def load_instruction_bank(directory: str | os.PathLike, width: int) -> torch.Tensor | None:
    """(M, width) unit vectors, or None for a router saved before the instruction gate existed."""
    from safetensors.torch import load_file

    path = Path(directory) / INSTRUCTIONS_NAME
    if not path.is_file():
        return None
    check_safetensors_file(path)
    tensors = load_file(str(path))
    bank = tensors.get("vectors")
    if set(tensors) != {"vectors"} or bank is None or bank.dim() != 2 or bank.shape[1] != width or len(bank) == 0:
        raise CheckpointError(f"{path}: expected one tensor 'vectors' shaped (M, {width}), got "
                              f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if not torch.isfinite(bank).all():
        raise CheckpointError(f"{path}: non-finite values")
    return bank.float()


class TaskRouter(nn.Module):
    """Pooled (B, L, 2, D) -> logits (B, n_packs): RMS-norm per vector, softmax layer mix, MLP."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.layer_logits = nn.Parameter(torch.zeros(config.num_layers))
        self.norm = nn.LayerNorm(2 * d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, config.hidden), nn.GELU(), nn.Linear(config.hidden, len(config.pack_names)))

    def check(self, pooled: torch.Tensor) -> None:
        want = (self.config.num_layers, 2, self.config.width)
        if pooled.dim() != 4 or tuple(pooled.shape[1:]) != want:
            raise ValueError(f"router input shaped {tuple(pooled.shape)}, expected (B, {want[0]}, {want[1]}, {want[2]})")

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        self.check(pooled)
        x = rms_normalize(pooled, self.config.eps)  # (B, L, 2, D), unit RMS per vector: layers of very different scale mix fairly
        w = torch.softmax(self.layer_logits, dim=0)  # (L,)
        mixed = torch.einsum("blkd,l->bkd", x, w).flatten(1)  # (B, 2 * D)
        return self.mlp(self.norm(mixed))  # (B, n_packs)

    @torch.inference_mode()
    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(pooled), dim=-1)

    def layer_weights(self) -> np.ndarray:
        return torch.softmax(self.layer_logits.detach(), dim=0).numpy()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class RouterFit:
    router: TaskRouter
    train_accuracy: float
    val_accuracy: float  # on held-out episodes (nan when val_fraction == 0)
    num_train: int
    num_val: int


def _split_episodes(labels: np.ndarray, episodes: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean is_val per example; whole episodes, per class, at least one train episode each."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    if val_fraction <= 0:
        return is_val
    for c in np.unique(labels):
        eps = np.unique(episodes[labels == c])
        n_val = min(int(round(len(eps) * val_fraction)), len(eps) - 1)
        val_eps = rng.permutation(eps)[:n_val]
        is_val |= (labels == c) & np.isin(episodes, val_eps)
    return is_val


def _fit(config: RouterConfig, x: torch.Tensor, y: torch.Tensor, train_cfg: RouterTrainConfig) -> TaskRouter:
    torch.manual_seed(train_cfg.seed)
    router = TaskRouter(config)
    counts = torch.bincount(y, minlength=len(config.pack_names)).float()
    weight = counts.sum() / counts.clamp(min=1.0) / len(config.pack_names)  # balance packs with unequal data
    opt = torch.optim.AdamW(router.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    router.train()
    for _ in range(train_cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(router(x), y)
        loss.backward()
        opt.step()
    return router.eval()


def _accuracy(router: TaskRouter, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    with torch.inference_mode():
        return float((router(x).argmax(-1) == y).float().mean())


def train_router(config: RouterConfig, pooled: np.ndarray | torch.Tensor, labels: np.ndarray, episodes: np.ndarray,
                 train_cfg: RouterTrainConfig | None = None) -> RouterFit:
    """Fit on pooled (N, L, 2, D) examples with pack labels (N,); ``episodes`` (N,) keys the split.

    Reports accuracy on held-out episodes, then refits on all examples (the returned router).
    """
    train_cfg = train_cfg or RouterTrainConfig()
    x = torch.as_tensor(np.asarray(pooled, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    episodes = np.asarray(episodes)
    if x.dim() != 4 or len(x) != len(y) or len(y) != len(episodes):
        raise ValueError(f"train_router: pooled (N, L, 2, D), labels (N,), episodes (N,) expected, got "
                         f"{tuple(x.shape)}, {tuple(y.shape)}, {episodes.shape}")
    missing = sorted(set(range(len(config.pack_names))) - set(y.tolist()))
    if missing:
        raise ValueError(f"train_router: no examples for packs {[config.pack_names[i] for i in missing]}")
    is_val = _split_episodes(y.numpy(), episodes, train_cfg.val_fraction, train_cfg.seed)
    val_acc = float("nan")
    if is_val.any():
        tr, va = torch.from_numpy(~is_val), torch.from_numpy(is_val)
        held = _fit(config, x[tr], y[tr], train_cfg)
        val_acc = _accuracy(held, x[va], y[va])
    router = _fit(config, x, y, train_cfg)
    return RouterFit(router, _accuracy(router, x, y), val_acc, int((~is_val).sum()), int(is_val.sum()))


def save_router(router: TaskRouter, directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(router.state_dict(), directory / WEIGHTS_NAME, {"format": "m2vla-router", "version": "1"})
    save_json(router.config, directory / CONFIG_NAME)
    return directory


def load_router(directory: str | os.PathLike) -> TaskRouter:
    """Strict load: JSON config (unknown keys refused), safetensors only, keys and shapes checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: router directory not found")
    refuse_pickles(directory)
    config = load_config_file(RouterConfig, directory / CONFIG_NAME, f"{directory}: no {CONFIG_NAME}")
    weights, state = read_weights(directory, WEIGHTS_NAME)
    router = TaskRouter(config)
    check_state_matches(state, router.state_dict(), weights, CONFIG_NAME)
    router.load_state_dict(state)
    return router.eval()
