"""Loss-curve PNGs (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_losses(history: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    train = np.asarray(history.get("train", []), dtype=float).reshape(-1, 2)  # (n, [step, loss])
    val = np.asarray(history.get("val", []), dtype=float).reshape(-1, 2)  # (n, [step, loss])
    if len(train):
        ax.plot(train[:, 0], train[:, 1], lw=0.6, alpha=0.35, color="C0", label="train (per step)")
        win = max(1, len(train) // 50)
        smooth = np.convolve(train[:, 1], np.ones(win) / win, mode="valid")
        ax.plot(train[win - 1:, 0], smooth, color="C0", label=f"train (mean of {win})")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("normalised MSE")
    ax.set_yscale("log")
    ax.set_title(title or "head training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
