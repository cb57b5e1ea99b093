"""PolicyHead: features (B, L, T, D) + mask (B, T) + state (B, S) -> action chunk (B, H, A).

MoL -> latent -> action head ("mlp" | "msm" | "skills"). Normalisation lives inside the
module (buffers saved in model.safetensors), so ``forward`` takes and returns physical units
and the exported ONNX graph needs no side files; training uses ``forward_normalized``.
``forward`` also keeps every waypoint inside the range of the demonstrated actions (set by the
trainer): a head that predicts offsets from the joints could otherwise extrapolate a joint past
a limit the demonstrations only approached, and the controller would refuse every chunk.

A head trained with an auxiliary loss (``arch.aux_weight``) also has ``aux_predictor``: from
the same latent, e.g. the objects' positions. ``forward`` does not use it (nor does the ONNX
graph); training and diagnostics (``predict_aux``) do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from m2vla_core.heads.configuration_head import ABSOLUTE_ACTION_NAMES, HeadConfig
from m2vla_core.heads.gripper_geometry import build_gripper_features
from m2vla_core.heads.layers import mlp
from m2vla_core.heads.mol.modeling_mol import MixtureOfLayers
from m2vla_core.heads.msm.modeling_msm import MetaSkillModule, memory_key, subsample_indices
from m2vla_core.heads.skills.modeling_skills import SmoothSkillDecoder

NORM_KEYS = ("normalizer.state_mean", "normalizer.state_std", "normalizer.action_mean",
             "normalizer.action_std", "normalizer.fitted")
RANGE_KEYS = ("normalizer.action_low", "normalizer.action_high")  # absent from checkpoints saved before them
STD_FLOOR = 1e-6  # a (near-)constant dimension is passed through with std 1 instead of blown up


class ContractError(ValueError):
    """Inputs do not match the head's feature contract / state / action shapes."""


class Normalizer(nn.Module):
    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.register_buffer("action_mean", torch.zeros(action_dim))
        self.register_buffer("action_std", torch.ones(action_dim))
        self.register_buffer("fitted", torch.zeros(()))  # 1 once real statistics were set
        # The demonstrated actions' range, absolute units; unbounded until ``set_action_range``.
        self.register_buffer("action_low", torch.full((action_dim,), -float("inf")))
        self.register_buffer("action_high", torch.full((action_dim,), float("inf")))

    def set_stats(self, state_mean: Any, state_std: Any, action_mean: Any, action_std: Any) -> None:
        values = {"state_mean": state_mean, "state_std": state_std, "action_mean": action_mean, "action_std": action_std}
        for name, value in values.items():
            t = torch.as_tensor(np.asarray(value, dtype=np.float32))
            if t.shape != getattr(self, name).shape or not torch.isfinite(t).all():
                raise ValueError(f"normalisation {name}: expected finite {tuple(getattr(self, name).shape)}, got {tuple(t.shape)}")
            if name.endswith("std"):
                t = torch.where(t < STD_FLOOR, torch.ones_like(t), t)
            getattr(self, name).copy_(t)
        self.fitted.fill_(1.0)

    def set_action_range(self, low: Any, high: Any) -> None:
        low_t, high_t = (torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in (low, high))
        for name, t in (("action_low", low_t), ("action_high", high_t)):
            if t.shape != self.action_low.shape or not torch.isfinite(t).all():
                raise ValueError(f"{name}: expected finite {tuple(self.action_low.shape)}, got {tuple(t.shape)}")
        if bool((low_t > high_t).any()):
            raise ValueError(f"action range: low {low_t.tolist()} above high {high_t.tolist()}")
        self.action_low.copy_(low_t)
        self.action_high.copy_(high_t)

    def clamp_action(self, action: torch.Tensor) -> torch.Tensor:
        """Into the action range; NaN stays NaN, so the controller still refuses it."""
        return torch.minimum(torch.maximum(action, self.action_low), self.action_high)

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        return (state - self.state_mean) / self.state_std

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.action_mean) / self.action_std

    def denormalize_action(self, action_n: torch.Tensor) -> torch.Tensor:
        return action_n * self.action_std + self.action_mean


class AuxTargetPredictor(nn.Module):
    """Flat latent (B, latent_dim) -> auxiliary targets (B, K), normalised by the training split's statistics."""

    def __init__(self, latent_dim: int, hidden: int, num_targets: int) -> None:
        super().__init__()
        self.net = mlp(latent_dim, hidden, num_targets, num_layers=2)
        self.register_buffer("target_mean", torch.zeros(num_targets))
        self.register_buffer("target_std", torch.ones(num_targets))

    def set_stats(self, mean: Any, std: Any) -> None:
        for name, value in (("target_mean", mean), ("target_std", std)):
            t = torch.as_tensor(np.asarray(value, dtype=np.float32))
            if t.shape != getattr(self, name).shape or not torch.isfinite(t).all():
                raise ValueError(f"auxiliary {name}: expected finite {tuple(getattr(self, name).shape)}, got {tuple(t.shape)}")
            if name == "target_std":
                t = torch.where(t < STD_FLOOR, torch.ones_like(t), t)
            getattr(self, name).copy_(t)

    def normalize(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets - self.target_mean) / self.target_std

    def forward(self, latent_flat: torch.Tensor) -> torch.Tensor:
        """Normalised prediction (B, K)."""
        return self.net(latent_flat)


class PolicyHead(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        arch, contract = config.arch, config.contract
        d, h, a = arch.d_model, config.chunk_len, config.action_dim
        # The state the layers read: the given one, then what is computed from it (gripper geometry).
        self.gripper_features = build_gripper_features(arch.gripper_features, tuple(config.state_names))
        s = config.state_dim + (self.gripper_features.num_features if self.gripper_features is not None else 0)
        self.normalizer = Normalizer(s, a)
        relative = [arch.relative_actions and name not in ABSOLUTE_ACTION_NAMES
                    for name in (config.action_names or ("",) * a)]
        self.register_buffer("relative_mask", torch.tensor(relative, dtype=torch.float32), persistent=False)  # (A,)
        self.mol = MixtureOfLayers(arch.mol, contract, s, d,
                                   fixed_pos=config.layer_position(arch.mol.fixed_layer, "middle"),
                                   router_pos=config.layer_position(arch.mol.router_layer, "first"))
        self.key_pos = config.layer_position(arch.msm.key_layer, "last")
        latent_dim = self.mol.latent_tokens * d
        if arch.action_head == "mlp":
            self.action_head = mlp(latent_dim + s, arch.mlp.hidden, h * a, num_layers=arch.mlp.num_layers + 1)
        elif arch.action_head == "skills":
            self.action_head = SmoothSkillDecoder(arch.skills, d_in=latent_dim + s, chunk_len=h, action_dim=a)
        else:
            self.action_head = MetaSkillModule(arch.msm, d_model=d, state_dim=s, chunk_len=h, action_dim=a,
                                               key_dim=contract.width + s)
        self.aux_predictor = (AuxTargetPredictor(latent_dim, arch.mlp.hidden, len(config.aux_target_names))
                              if config.aux_target_names else None)

    # -- inputs ---------------------------------------------------------------------------------
    def check_inputs(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor) -> None:
        """Raise ContractError naming the mismatch (batched inputs)."""
        cfg = self.config
        want = cfg.contract.shape
        if features.dim() != 4 or tuple(features.shape[1:]) != want:
            raise ContractError(f"features shaped {tuple(features.shape)}, head expects (B, n_layers, T, D) = (B, {want[0]}, "
                                f"{want[1]}, {want[2]}) for layers {cfg.contract.layers}")
        if mask.dim() != 2 or tuple(mask.shape) != (features.shape[0], want[1]):
            raise ContractError(f"mask shaped {tuple(mask.shape)}, head expects (B, T) = ({features.shape[0]}, {want[1]})")
        if mask.dtype != torch.bool:
            raise ContractError(f"mask dtype {mask.dtype}, head expects torch.bool")
        if state.dim() != 2 or tuple(state.shape) != (features.shape[0], cfg.state_dim):
            raise ContractError(f"state shaped {tuple(state.shape)}, head expects (B, S) = ({features.shape[0]}, {cfg.state_dim})")

    # -- forward --------------------------------------------------------------------------------
    def forward_normalized(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor,
                           exclude_episode: torch.Tensor | None = None) -> torch.Tensor:
        """Chunk in normalised units (B, H, A); ``exclude_episode`` (B,) is for MSM training only."""
        return self.forward_training(features, mask, state, exclude_episode, with_aux=False)[0]

    def forward_training(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor,
                         exclude_episode: torch.Tensor | None = None, *,
                         with_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(chunk (B, H, A), auxiliary prediction (B, K) or None), both normalised, from one MoL pass."""
        state_n, latent = self._latent(features, mask, state)
        aux = self.aux_predictor(latent.flatten(1)) if with_aux and self.aux_predictor is not None else None
        return self._decode(features, mask, state_n, latent, exclude_episode), aux

    def _latent(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised state (B, S), MoL latent (B, Q + keypoints, d)) of checked inputs."""
        self.check_inputs(features, mask, state)
        state_n = self.normalizer.normalize_state(self.input_state(state))
        latent, _ = self.mol(features, mask, state_n)
        return state_n, latent

    def input_state(self, state: torch.Tensor) -> torch.Tensor:
        """(B, S) state as given -> (B, S + E) what the layers read (normalised after this)."""
        if self.gripper_features is None:
            return state
        return torch.cat([state, self.gripper_features(state)], dim=-1)

    @torch.no_grad()
    def predict_aux(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The auxiliary targets (B, K) in their own units (e.g. metres), for diagnostics."""
        if self.aux_predictor is None:
            raise RuntimeError("this head was trained without auxiliary targets (arch.aux_weight = 0)")
        _, latent = self._latent(features, mask, state)
        aux_n = self.aux_predictor(latent.flatten(1))  # (B, K); no action decoding needed
        return aux_n * self.aux_predictor.target_std + self.aux_predictor.target_mean

    def _decode(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor, latent: torch.Tensor,
                exclude_episode: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.action_head, MetaSkillModule):
            key = self.retrieval_key(features, mask, state_n)
            return self.action_head(latent, state_n, key, exclude_episode)
        h = torch.cat([latent.flatten(1), state_n], dim=-1)  # (B, Q * d + S)
        out = self.action_head(h)
        if isinstance(self.action_head, SmoothSkillDecoder):
            return out
        return out.unflatten(-1, (self.config.chunk_len, self.config.action_dim))  # (B, H, A)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Action chunk (B, H, A) in the action space's units, inside the demonstrated range."""
        return self.normalizer.clamp_action(self.unbounded_action(self.forward_normalized(features, mask, state), state))

    def unbounded_action(self, action_n: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """(B, H, A) what ``forward_normalized`` outputs -> absolute targets, before the action
        range's clamp (the inverse of ``normalized_action_target``; losses on it keep a gradient)."""
        return self.normalizer.denormalize_action(action_n) + self.action_origin(state)

    def action_origin(self, state: torch.Tensor) -> torch.Tensor:
        """(B, 1, A) what the layers' waypoints are relative to: with ``arch.relative_actions`` the
        state's first A entries (zero for ``ABSOLUTE_ACTION_NAMES``), else zero."""
        return state[:, None, :self.config.action_dim] * self.relative_mask

    def normalized_action_target(self, actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """(B, H, A) absolute targets -> what ``forward_normalized`` is trained to output."""
        return self.normalizer.normalize_action(actions - self.action_origin(state))

    @torch.no_grad()
    def layer_weights(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """MoL weights (B, n_layers) over ``config.contract.layers``; rows sum to 1."""
        self.check_inputs(features, mask, state)
        return self.mol.layer_weights(features, mask, self.normalizer.normalize_state(self.input_state(state)))

    # -- memory ---------------------------------------------------------------------------------
    def retrieval_key(self, features: torch.Tensor, mask: torch.Tensor, state_n: torch.Tensor) -> torch.Tensor:
        return memory_key(features, mask, state_n, key_pos=self.key_pos,
                          state_weight=self.config.arch.msm.key_state_weight, eps=self.config.arch.mol.eps)

    @property
    def uses_memory(self) -> bool:
        return isinstance(self.action_head, MetaSkillModule)

    @torch.no_grad()
    def build_memory(self, dataset, indices: np.ndarray | None = None, batch_size: int = 512) -> int:
        """Fill the skill memory from ``dataset`` (``episode_index`` array + ``batch(idx)`` dict of
        tensors, e.g. ``FeatureDataset``), restricted to ``indices``; needs normalisation stats.
        Returns the number of entries kept (at most ``arch.msm.memory_size``)."""
        if not self.uses_memory:
            raise RuntimeError(f"action head {self.config.arch.action_head!r} has no skill memory")
        if not bool(self.normalizer.fitted):
            raise RuntimeError("set normalisation statistics before build_memory (keys use the normalised state)")
        indices = np.arange(len(dataset.episode_index)) if indices is None else np.asarray(indices)
        episodes = np.asarray(dataset.episode_index)[indices]
        picked = indices[subsample_indices(episodes, self.config.arch.msm.memory_size)]
        if len(picked) < self.config.arch.msm.top_k:
            raise ValueError(f"build_memory: {len(picked)} samples, fewer than msm.top_k={self.config.arch.msm.top_k}")
        keys, values, eps = [], [], []
        for start in range(0, len(picked), batch_size):
            b = dataset.batch(picked[start:start + batch_size])
            state_n = self.normalizer.normalize_state(self.input_state(b["state"]))
            keys.append(self.retrieval_key(b["hidden"], b["mask"], state_n))
            values.append(self.normalized_action_target(b["actions"], b["state"]))
            eps.append(b["episode_index"])
        self.action_head.memory.set(torch.cat(keys), torch.cat(values), torch.cat(eps))
        return len(picked)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
