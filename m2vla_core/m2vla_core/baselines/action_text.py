"""Actions written as text: uniform bins per dimension, two decimal digits per value.

VLM2VLA's point is that actions expressed in the VLM's own language need no new vocabulary
and little change to the model. With our tiny byte-level tokenizer, digits are single
tokens, so a value costs two tokens and a waypoint of A values is one 2A-digit word.
Decoding is forgiving: a malformed reply still yields a chunk (a run-on word keeps its first
2A digits, missing waypoints repeat the last one read, an unreadable reply holds the current
state) and says it was not well formed.
"""

from __future__ import annotations

import numpy as np

from m2vla_core.baselines.configuration_text_policy import ActionTextConfig


def to_bins(x: np.ndarray, low, high, num_bins: int) -> np.ndarray:
    """Values (..., D) -> bin indices in [0, num_bins) (out-of-range values clip to the end bins)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    b = np.floor((np.asarray(x, dtype=np.float64) - low) / (high - low) * num_bins)
    return np.clip(b, 0, num_bins - 1).astype(np.int64)


def from_bins(b: np.ndarray, low, high, num_bins: int) -> np.ndarray:
    """Bin indices (..., D) -> bin centres (float32)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    return (low + (np.asarray(b, dtype=np.float64) + 0.5) * (high - low) / num_bins).astype(np.float32)


def _digits(bins: np.ndarray) -> str:
    return "".join(f"{int(v):02d}" for v in bins)


class ActionTextCodec:
    """(H, A) joint-target chunk <-> text, relative to the current joint state."""

    def __init__(self, config: ActionTextConfig) -> None:
        self.config = config

    @property
    def resolution(self) -> np.ndarray:
        """(A,) bin width of the action deltas: round trips are exact to half of it."""
        c = self.config
        return (np.asarray(c.action_high) - np.asarray(c.action_low)) / c.num_bins

    def encode_state(self, state: np.ndarray) -> str:
        c = self.config
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (c.state_dim,):
            raise ValueError(f"state shaped {state.shape}, codec expects ({c.state_dim},)")
        return _digits(to_bins(state, c.state_low, c.state_high, c.num_bins))

    def encode(self, chunk: np.ndarray, state: np.ndarray) -> str:
        """Absolute targets (H, A) + state (A,) -> 'w1 w2 ... wH' (each word 2A digits)."""
        c = self.config
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.shape != (c.chunk_len, c.action_dim):
            raise ValueError(f"chunk shaped {chunk.shape}, codec expects ({c.chunk_len}, {c.action_dim})")
        delta = chunk - np.asarray(state, dtype=np.float64)[None, : c.action_dim]  # (H, A)
        bins = to_bins(delta, c.action_low, c.action_high, c.num_bins)  # (H, A)
        return " ".join(_digits(row) for row in bins)

    def decode(self, text: str, state: np.ndarray) -> tuple[np.ndarray, bool]:
        """Text -> (absolute targets (H, A) float32, well_formed)."""
        c = self.config
        state = np.asarray(state, dtype=np.float32)[: c.action_dim]
        width = 2 * c.action_dim
        rows, exact = [], True
        for word in text.split():
            if len(word) < width or not word.isdigit():
                break
            exact &= len(word) == width  # a run-on word (missed separator / EOS) keeps its first 2A digits
            rows.append([int(word[i:i + 2]) for i in range(0, width, 2)])
            if len(rows) == c.chunk_len:
                break
        well_formed = exact and len(rows) == c.chunk_len and all(v < c.num_bins for r in rows for v in r)
        if not rows:
            return np.repeat(state[None], c.chunk_len, axis=0), False  # hold: (H, A)
        bins = np.minimum(np.asarray(rows, dtype=np.int64), c.num_bins - 1)  # (h, A), h <= H
        bins = np.concatenate([bins, np.repeat(bins[-1:], c.chunk_len - len(bins), axis=0)])  # (H, A)
        return state[None] + from_bins(bins, c.action_low, c.action_high, c.num_bins), well_formed
