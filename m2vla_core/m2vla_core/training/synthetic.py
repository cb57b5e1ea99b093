"""A small synthetic feature dataset with learnable structure, for tests and smoke runs.

Each episode belongs to a task (a goal joint configuration); its "features" carry the task's
signature and the episode phase plus noise, the state follows a smooth path from a random
start to the goal, and the action chunk is the next H states. A head can only predict the
chunk by reading the features (which goal, which phase) and the state. With ``aux_targets``
the first two goal coordinates are also stored as auxiliary targets (readable from the features).
"""

from __future__ import annotations

import os

import numpy as np

from m2vla_core.features import FeatureContract
from m2vla_core.training.feature_dataset import FeatureDatasetMeta, FeatureDatasetWriter


def write_synthetic_dataset(path: str | os.PathLike, *, contract: FeatureContract, num_episodes: int = 8,
                            episode_len: int = 24, num_tasks: int = 3, state_dim: int = 8, chunk_len: int = 16,
                            noise: float = 0.1, seed: int = 0, backbone_id: str = "test-backbone",
                            backbone_digest: str = "ab" * 32, shard_size: int = 2048,
                            aux_targets: bool = False) -> FeatureDatasetMeta:
    rng = np.random.default_rng(seed)
    n_layers, tokens, width = contract.shape
    goals = rng.uniform(-1.0, 1.0, size=(num_tasks, state_dim)).astype(np.float32)  # (K, S)
    signatures = rng.normal(size=(num_tasks, n_layers, tokens, width)).astype(np.float32)  # (K, L, T, D)
    phase_dir = rng.normal(size=(n_layers, tokens, width)).astype(np.float32)  # (L, T, D)
    meta = FeatureDatasetMeta(contract=contract, state_dim=state_dim, action_space="joint", action_dim=state_dim,
                              chunk_len=chunk_len, dt_s=0.1, backbone_id=backbone_id, backbone_digest=backbone_digest,
                              task_names=tuple(f"task{k}" for k in range(num_tasks)),
                              aux_target_names=("goal_0", "goal_1") if aux_targets else ())
    total = episode_len + chunk_len
    with FeatureDatasetWriter(path, meta, shard_size=shard_size) as writer:
        for ep in range(num_episodes):
            task = ep % num_tasks
            start = rng.uniform(-1.0, 1.0, size=state_dim).astype(np.float32)
            s = np.linspace(0.0, 1.0, total, dtype=np.float32)
            path_q = start + (goals[task] - start) * (3 * s**2 - 2 * s**3)[:, None]  # (total, S), smoothstep
            t = np.arange(episode_len)
            phase = (t / episode_len).astype(np.float32)
            hidden = signatures[task][None] + phase[:, None, None, None] * phase_dir[None] \
                + noise * rng.normal(size=(episode_len, n_layers, tokens, width)).astype(np.float32)  # (N, L, T, D)
            mask = np.ones((episode_len, tokens), dtype=bool)
            mask[:, contract.num_image_tokens + 1 + task:] = False  # instruction length varies by task
            actions = np.stack([path_q[i + 1:i + 1 + chunk_len] for i in t])  # (N, H, A)
            writer.add(hidden, mask, path_q[:episode_len], actions, np.full(episode_len, ep), np.full(episode_len, task),
                       aux_targets=np.tile(goals[task][:2], (episode_len, 1)) if aux_targets else None)
    return writer.meta
