"""Training-set format: cached backbone features + robot state + future action chunks.

A dataset is a directory::

    meta.json                    FeatureDatasetMeta (contract, state/action spaces, H, dt_s,
                                 backbone id + digest, counts, shard list)
    shard-00000.safetensors      hidden (N, n_layers, T, D) float16|float32, mask (N, T) bool,
    shard-00001.safetensors      state (N, S), actions (N, H, A) float32,
    ...                          episode_index (N,), task_index (N,) int64,
                                 aux_targets (N, K) float32 when meta.aux_target_names is set

Only shards listed in meta.json exist as far as readers are concerned; both are written to a
temporary name and renamed, so a crash never leaves a half-written dataset that reads as
valid. Reading parses JSON + safetensors only (never pickle).

``aux_targets`` are quantities a head may be taught to predict besides its actions (every
object's position, ``m2vla features --object-targets``); NaN marks one a sample does not have
(an object not in that layout). A head never reads them as input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from m2vla_core.config_io import ConfigError, load_json, save_json
from m2vla_core.features import FeatureContract
from m2vla_core.heads.checkpoint import CheckpointError, atomic_save_safetensors, check_safetensors_file
from m2vla_core.heads.configuration_head import ACTION_SPACES, EEF_ACTION_DIM, HeadArchConfig, HeadConfig

META_NAME = "meta.json"
FIELDS = ("hidden", "mask", "state", "actions", "episode_index", "task_index")
AUX_FIELD = "aux_targets"  # only in datasets whose meta names auxiliary targets
HIDDEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DATASET_FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A feature dataset is missing, damaged, or does not match its meta.json."""


@dataclass
class FeatureDatasetMeta:
    contract: FeatureContract
    state_dim: int
    action_space: str  # "joint" | "eef"
    action_dim: int
    chunk_len: int  # H
    dt_s: float  # [s] between chunk waypoints
    backbone_id: str
    backbone_digest: str
    hidden_dtype: str = "float16"  # storage dtype of `hidden`
    state_names: tuple[str, ...] = ()
    action_names: tuple[str, ...] = ()
    task_names: tuple[str, ...] = ()  # task_index -> name, optional
    aux_target_names: tuple[str, ...] = ()  # columns of aux_targets; () = the dataset has none
    num_episodes: int = 0  # filled by the writer
    num_samples: int = 0
    shards: tuple[str, ...] = ()
    format_version: int = DATASET_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("state_dim", "action_dim", "chunk_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureDatasetMeta.{name} must be >= 1, got {getattr(self, name)}")
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"FeatureDatasetMeta.action_space must be one of {ACTION_SPACES}, got {self.action_space!r}")
        if self.action_space == "eef" and self.action_dim != EEF_ACTION_DIM:
            raise ValueError(f"FeatureDatasetMeta.action_dim must be {EEF_ACTION_DIM} for 'eef', got {self.action_dim}")
        if not self.dt_s > 0:
            raise ValueError(f"FeatureDatasetMeta.dt_s must be > 0, got {self.dt_s}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"FeatureDatasetMeta.hidden_dtype must be one of {tuple(HIDDEN_DTYPES)}, got {self.hidden_dtype!r}")
        if self.num_episodes < 0 or self.num_samples < 0:
            raise ValueError(f"FeatureDatasetMeta counts must be >= 0, got {self.num_episodes}/{self.num_samples}")
        if self.format_version != DATASET_FORMAT_VERSION:
            raise ValueError(f"FeatureDatasetMeta.format_version {self.format_version} unsupported")
        if len(set(self.aux_target_names)) != len(self.aux_target_names):
            raise ValueError(f"FeatureDatasetMeta.aux_target_names repeats a name: {self.aux_target_names}")

    def head_config(self, arch: HeadArchConfig) -> HeadConfig:
        """The HeadConfig of a head trained on this dataset with architecture ``arch``.

        An architecture with an auxiliary loss predicts this dataset's aux targets; it needs some.
        """
        if arch.aux_weight > 0 and not self.aux_target_names:
            raise DatasetError("arch.aux_weight > 0 needs a dataset with auxiliary targets "
                               "(`m2vla features --object-targets`); this one has none")
        return HeadConfig(contract=self.contract, state_dim=self.state_dim, action_space=self.action_space,
                          action_dim=self.action_dim, chunk_len=self.chunk_len, dt_s=self.dt_s,
                          backbone_id=self.backbone_id, backbone_digest=self.backbone_digest, arch=arch,
                          state_names=self.state_names, action_names=self.action_names,
                          aux_target_names=self.aux_target_names if arch.aux_weight > 0 else ())

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields every shard holds."""
        return (*FIELDS, AUX_FIELD) if self.aux_target_names else FIELDS

    def field_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of each stored field."""
        shapes = {"hidden": self.contract.shape, "mask": (self.contract.num_tokens,), "state": (self.state_dim,),
                  "actions": (self.chunk_len, self.action_dim), "episode_index": (), "task_index": ()}
        if self.aux_target_names:
            shapes[AUX_FIELD] = (len(self.aux_target_names),)
        return shapes


class FeatureDatasetWriter:
    """Append samples (one or a batch) and write safetensors shards + meta.json atomically.

    ``FeatureDatasetWriter(path, meta).add(hidden, mask, state, actions, episode_index, task_index)``
    (plus ``aux_targets=`` when the meta names some) then ``.close()`` (or use it as a context
    manager). ``append=True`` continues an existing dataset whose meta matches.
    """

    def __init__(self, path: str | os.PathLike, meta: FeatureDatasetMeta, *, shard_size: int = 2048,
                 append: bool = False) -> None:
        self.path = Path(path)
        self.shard_size = int(shard_size)
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / META_NAME
        self._episodes: set[int] = set()
        if meta_path.exists():
            if not append:
                raise DatasetError(f"{self.path}: already holds a dataset; pass append=True or choose a new directory")
            existing = FeatureDataset(self.path, load=False).meta
            clean = replace(existing, num_episodes=0, num_samples=0, shards=())
            if clean != replace(meta, num_episodes=0, num_samples=0, shards=()):
                raise DatasetError(f"{self.path}: meta of the existing dataset differs from the one given")
            for shard in existing.shards:
                with safe_open(str(self.path / shard), framework="pt") as f:
                    self._episodes.update(int(e) for e in f.get_tensor("episode_index").tolist())
            self.meta = existing
        else:
            self.meta = replace(meta, num_episodes=0, num_samples=0, shards=())
        self._shapes = self.meta.field_shapes()
        self._pending: dict[str, list[torch.Tensor]] = {k: [] for k in self.meta.fields}
        self._pending_n = 0
        self._closed = False

    @property
    def next_episode_index(self) -> int:
        """One past the largest episode index written so far (0 for a new dataset)."""
        return max(self._episodes) + 1 if self._episodes else 0

    def add(self, hidden: Any, mask: Any, state: Any, actions: Any, episode_index: Any, task_index: Any,
            aux_targets: Any = None) -> None:
        """One sample (hidden (n_layers, T, D), ...) or a batch (hidden (N, n_layers, T, D), ...)."""
        if self._closed:
            raise DatasetError("writer is closed")
        if (aux_targets is None) == bool(self.meta.aux_target_names):
            raise DatasetError(f"add(): aux_targets {'missing' if aux_targets is None else 'given'}; the meta names "
                               f"{len(self.meta.aux_target_names)} auxiliary targets {self.meta.aux_target_names}")
        values = dict(hidden=hidden, mask=mask, state=state, actions=actions, episode_index=episode_index,
                      task_index=task_index)
        if aux_targets is not None:
            values[AUX_FIELD] = aux_targets
        tensors = {k: torch.as_tensor(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)) for k, v in values.items()}
        single = tensors["hidden"].dim() == len(self._shapes["hidden"])
        if single:
            tensors = {k: t.unsqueeze(0) for k, t in tensors.items()}  # (1, ...) a batch of one
        n = tensors["hidden"].shape[0]
        for key, t in tensors.items():
            if tuple(t.shape) != (n, *self._shapes[key]):
                raise DatasetError(f"add(): {key} shaped {tuple(t.shape)}, expected {(n, *self._shapes[key])} "
                                   f"(meta: contract {self.meta.contract.shape}, S={self.meta.state_dim}, "
                                   f"H={self.meta.chunk_len}, A={self.meta.action_dim})")
        floats = [k for k in ("state", "actions", AUX_FIELD) if k in tensors]
        for key in ("hidden", "state", "actions"):
            if not torch.isfinite(tensors[key].float()).all():
                raise DatasetError(f"add(): {key} contains NaN or inf")
        if AUX_FIELD in tensors and torch.isinf(tensors[AUX_FIELD].float()).any():
            raise DatasetError(f"add(): {AUX_FIELD} contains inf (NaN marks an absent target)")
        self._pending["hidden"].append(tensors["hidden"].to(HIDDEN_DTYPES[self.meta.hidden_dtype]))
        self._pending["mask"].append(tensors["mask"].to(torch.bool))
        for key in floats:
            self._pending[key].append(tensors[key].to(torch.float32))
        for key in ("episode_index", "task_index"):
            self._pending[key].append(tensors[key].to(torch.int64))
        self._episodes.update(int(e) for e in tensors["episode_index"].tolist())
        self._pending_n += n
        if self._pending_n >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write pending samples as a new shard and update meta.json (both atomic)."""
        if not self._pending_n:
            if not (self.path / META_NAME).exists():
                save_json(self.meta, self.path / META_NAME)
            return
        shard = f"shard-{len(self.meta.shards):05d}.safetensors"
        atomic_save_safetensors({k: torch.cat(v) for k, v in self._pending.items()}, self.path / shard,
                                {"format": "m2vla-features", "version": str(DATASET_FORMAT_VERSION)})
        self.meta = replace(self.meta, shards=(*self.meta.shards, shard), num_samples=self.meta.num_samples + self._pending_n,
                            num_episodes=len(self._episodes))
        save_json(self.meta, self.path / META_NAME)
        self._pending = {k: [] for k in self.meta.fields}
        self._pending_n = 0

    def close(self) -> FeatureDatasetMeta:
        if not self._closed:
            self.flush()
            self._closed = True
        return self.meta

    def __enter__(self) -> "FeatureDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def frame_positions(episode_index: np.ndarray) -> np.ndarray:
    """(N,) each sample's place in its episode (0 = first frame); samples are stored in frame order."""
    episode_index = np.asarray(episode_index)
    order = np.argsort(episode_index, kind="stable")  # (N,) episodes grouped, frame order kept
    grouped = episode_index[order]
    starts = np.r_[0, np.nonzero(np.diff(grouped))[0] + 1]  # (E,) first row of each episode
    positions = np.arange(len(grouped)) - np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
    frame_index = np.empty_like(positions)
    frame_index[order] = positions
    return frame_index


class FeatureDataset:
    """Reads a feature dataset fully into memory (hidden kept in its storage dtype)."""

    def __init__(self, path: str | os.PathLike, *, load: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise DatasetError(f"{self.path}: no {META_NAME}; not a feature dataset")
        try:
            self.meta = load_json(FeatureDatasetMeta, meta_path)
        except (ConfigError, ValueError) as exc:
            raise DatasetError(f"{meta_path}: {exc}") from exc
        if not load:
            return
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.meta.fields}
        shapes = self.meta.field_shapes()
        for shard in self.meta.shards:
            shard_path = self.path / shard
            if Path(shard).name != shard or not shard_path.is_file():
                raise DatasetError(f"{self.path}: shard {shard!r} listed in {META_NAME} is missing")
            try:
                check_safetensors_file(shard_path)
                tensors = load_file(str(shard_path))
            except CheckpointError as exc:
                raise DatasetError(str(exc)) from exc
            n = tensors["hidden"].shape[0] if "hidden" in tensors else -1
            for key in self.meta.fields:
                if key not in tensors or tuple(tensors[key].shape) != (n, *shapes[key]):
                    raise DatasetError(f"{shard_path}: field {key!r} missing or not shaped (N, {shapes[key]})")
                parts[key].append(tensors[key])
        if not self.meta.shards:
            raise DatasetError(f"{self.path}: dataset has no samples")
        data = {k: torch.cat(v) for k, v in parts.items()}
        if data["hidden"].shape[0] != self.meta.num_samples:
            raise DatasetError(f"{self.path}: {data['hidden'].shape[0]} samples in shards, meta.json says {self.meta.num_samples}")
        self.hidden, self.mask, self.state = data["hidden"], data["mask"], data["state"]
        self.actions = data["actions"]
        self.episode_index = data["episode_index"].numpy()
        self.task_index = data["task_index"].numpy()
        self.aux_targets: torch.Tensor | None = data.get(AUX_FIELD)  # (N, K) or None
        self.frame_index = frame_positions(self.episode_index)  # (N,)

    def __len__(self) -> int:
        return len(self.episode_index)

    def batch(self, idx: Any) -> dict[str, torch.Tensor]:
        """Samples ``idx`` as float32 / bool / int64 tensors ready for the head."""
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
        batch = {"hidden": self.hidden[idx_t].float(), "mask": self.mask[idx_t], "state": self.state[idx_t],
                 "actions": self.actions[idx_t], "episode_index": torch.as_tensor(self.episode_index)[idx_t],
                 "task_index": torch.as_tensor(self.task_index)[idx_t]}
        if self.aux_targets is not None:
            batch[AUX_FIELD] = self.aux_targets[idx_t]
        return batch

    def split_by_episode(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) sample indices; whole episodes go to one side. At least one episode
        stays in train; val is empty when there is a single episode or val_fraction == 0."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        episodes = np.unique(self.episode_index)
        rng = np.random.default_rng(seed)
        shuffled = rng.permutation(episodes)
        n_val = min(int(round(len(episodes) * val_fraction)), len(episodes) - 1)
        if val_fraction > 0 and n_val == 0 and len(episodes) > 1:
            n_val = 1
        val_eps = np.sort(shuffled[:n_val])
        is_val = np.isin(self.episode_index, val_eps)
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]
