"""Action / state normalisation statistics, computed on the training split only."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class NormalizationStats:
    state_mean: np.ndarray  # (S,)
    state_std: np.ndarray  # (S,)
    action_mean: np.ndarray  # (A,) over all samples and chunk steps
    action_std: np.ndarray  # (A,)
    action_low: np.ndarray | None = None  # (A,) the absolute actions' range, which the head's output is kept in
    action_high: np.ndarray | None = None

    def apply_to(self, head) -> None:
        head.normalizer.set_stats(self.state_mean, self.state_std, self.action_mean, self.action_std)
        if self.action_low is not None:
            head.normalizer.set_action_range(self.action_low, self.action_high)


def compute_stats(state: np.ndarray, actions: np.ndarray) -> NormalizationStats:
    """Per-dimension mean / std of state (N, S) and actions (N, H, A) in float64."""
    state = np.asarray(state, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, np.shape(actions)[-1])  # (N * H, A)
    if len(state) == 0:
        raise ValueError("cannot compute normalisation statistics of an empty split")
    return NormalizationStats(state.mean(0).astype(np.float32), state.std(0).astype(np.float32),
                              actions.mean(0).astype(np.float32), actions.std(0).astype(np.float32))


def dataset_stats(dataset, indices: np.ndarray, head) -> NormalizationStats:
    """Statistics of the split as ``head``'s layers see it: what they read (``head.input_state``:
    the given state and what the head computes from it, e.g. the gripper's position) and output
    (the actions relative to ``head.action_origin``), and the range of the absolute actions."""
    state, actions = dataset.state[indices], dataset.actions[indices]
    with torch.no_grad():
        stats = compute_stats(head.input_state(state).numpy(), (actions - head.action_origin(state)).numpy())
    flat = actions.reshape(-1, actions.shape[-1])  # (N * H, A)
    return replace(stats, action_low=flat.min(0).values.numpy(), action_high=flat.max(0).values.numpy())
