"""``m2vla probe``: does a backbone's image features say *where* the objects are?

A policy head can only place the gripper on a cube whose position the frozen features carry.
This measures that directly, before any policy is trained: first frames of the task suite
(arm at home, nothing occluded), the position of each coloured cube as the label (read from
the episode layout), and a small probe trained on some layouts and scored on held-out ones.

The probe is the same for every feature source: a detector shared across tokens (one MLP,
scores per colour) gives a spatial softmax over the tokens; the prediction is the
softmax-weighted token position (learned, initialised on the token grid) plus a learned
per-token offset, mapped to table coordinates by an affine map. Sources compared:

- ``pixels``: the frame itself, averaged into 7x7-pixel blocks on the same token grid as the
  backbone's image tokens (what a perfect feature extractor could at least keep);
- ``layer L``: the backbone's image tokens at hidden-state layer L of a contract;
- ``mean``: always predicting the training mean (the floor any useful source beats).

Errors are distances in the table plane [m]; medians over held-out cubes. The probe's fit is
not convex and some restarts stall (on pixels too), so each source gets several seeds and the
figure reported is the held-out error of the seed that fitted the *training* layouts best;
all seeds are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from m2vla_core.heads.localiser import SpatialProbe

PIXEL_BLOCK = 7  # px: 224 / 8 tokens = 28 px per token -> 4 x 4 blocks of 7 px


@dataclass(frozen=True)
class ProbeConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: int = 64
    val_fraction: float = 0.2  # of layouts
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.hidden < 1:
            raise ValueError(f"ProbeConfig steps/batch_size/hidden must be >= 1, got {self.steps}/{self.batch_size}/{self.hidden}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"ProbeConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.seeds:
            raise ValueError("ProbeConfig.seeds must not be empty")


@dataclass
class SourceResult:
    source: str
    val_median_m: list[float]  # one per probe seed
    train_median_m: list[float]

    @property
    def selected_val_m(self) -> float:
        """Held-out error of the seed with the best training fit (selection never sees held-out data)."""
        return self.val_median_m[int(np.argmin(self.train_median_m))]


def split_layouts(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    present = ~torch.isnan(target[..., 0])
    return (pred - torch.nan_to_num(target)).norm(dim=-1)[present]


def fit_probe(tokens: torch.Tensor, targets: np.ndarray, train: np.ndarray, val: np.ndarray, cfg: ProbeConfig,
              seed: int) -> tuple[float, float]:
    """Train on ``train`` layouts, return (val median, train median) error [m]. ``targets`` (N, K, 2), NaN = absent."""
    x = tokens.float()
    mean, std = x[train].mean((0, 1)), x[train].std((0, 1)) + 1e-6
    x = (x - mean) / std
    y = torch.as_tensor(targets, dtype=torch.float32)
    torch.manual_seed(seed)
    probe = SpatialProbe(x.shape[-1], x.shape[1], y.shape[1], cfg.hidden)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    for _ in range(cfg.steps):
        idx = torch.as_tensor(train[rng.integers(len(train), size=cfg.batch_size)])
        loss = (_errors(probe(x[idx]), y[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (float(_errors(probe(x[val]), y[val]).median()), float(_errors(probe(x[train]), y[train]).median()))


def mean_baseline(targets: np.ndarray, train: np.ndarray, val: np.ndarray) -> float:
    mean = np.nanmean(targets[train], axis=0)  # (K, 2)
    err = np.linalg.norm(targets[val] - mean[None], axis=-1)
    return float(np.nanmedian(err))


def pixel_tokens(images: np.ndarray, grid: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, grid*grid, blocks*blocks*3) block-mean colours per token cell."""
    n, h, w, _ = images.shape
    cell = h // grid
    if h != w or cell * grid != h or cell % PIXEL_BLOCK:
        raise ValueError(f"pixel_tokens needs square frames whose side is grid * k * {PIXEL_BLOCK}, got {h}x{w}, grid {grid}")
    b = cell // PIXEL_BLOCK
    x = torch.as_tensor(images, dtype=torch.float32) / 255.0
    x = x.view(n, grid, b, PIXEL_BLOCK, grid, b, PIXEL_BLOCK, 3).mean((3, 6))  # (N, g, b, g, b, 3)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, b * b * 3)


def first_frames(episodes_per_task: int, seed_offset: int = 0, image_size: int | None = None):
    """Rendered first frames of every task x seed, and (N, 4, 2) cube positions by colour (NaN = absent).

    ``image_size`` renders square frames of that side [px] (default: the simulator's camera).
    """
    from m2vla_core.sim import SimConfig, TaskEnv
    from m2vla_core.sim.tasks import COLOURS, TASKS

    images, targets = [], []
    sim = SimConfig() if image_size is None else SimConfig(image_width=image_size, image_height=image_size)
    with TaskEnv(sim) as env:
        for task in TASKS:
            for seed in range(seed_offset, seed_offset + episodes_per_task):
                obs = env.reset(task, seed)
                row = np.full((len(COLOURS), 2), np.nan)
                for cube in env.spec.layout.cubes:
                    row[COLOURS.index(cube.colour)] = cube.xy_m
                images.append(obs.image)
                targets.append(row)
    return np.stack(images), np.stack(targets)


def backbone_tokens(backbone, images: np.ndarray, layers: list[int], batch: int = 32) -> dict[int, torch.Tensor]:
    """Image tokens (N, T, D) at each hidden-state layer, at the backbone's native grid."""
    contract = backbone.contract(layers, num_text_tokens=1)
    parts: list[torch.Tensor] = []
    for start in range(0, len(images), batch):
        bundles = backbone.extract_batch(list(images[start:start + batch]), "the cube", contract)
        parts.append(torch.stack([torch.as_tensor(b.numpy()[0][:, : contract.num_image_tokens]) for b in bundles]))
    hidden = torch.cat(parts)  # (N, nL, T_img, D)
    return {layer: hidden[:, i] for i, layer in enumerate(layers)}


def run_probe(images: np.ndarray, targets: np.ndarray, sources: dict[str, torch.Tensor], cfg: ProbeConfig,
              log=print) -> dict:
    train, val = split_layouts(len(images), cfg.val_fraction)
    results = []
    for name, tokens in sources.items():
        vals, trains = [], []
        for seed in cfg.seeds:
            v, t = fit_probe(tokens, targets, train, val, cfg, seed)
            vals.append(v)
            trains.append(t)
        result = SourceResult(name, vals, trains)
        results.append(result)
        log(f"{name:<12} held-out median error {result.selected_val_m * 100:5.1f} cm, train {min(trains) * 100:.1f} cm "
            f"(held-out per seed: {', '.join(f'{v * 100:.1f}' for v in vals)})")
    baseline = mean_baseline(targets, train, val)
    log(f"{'mean':<12} held-out median error {baseline * 100:5.1f} cm (always the training mean)")
    return {"config": asdict(cfg), "layouts": {"train": int(len(train)), "val": int(len(val))},
            "mean_baseline_m": baseline,
            "sources": [{**asdict(r), "selected_val_m": r.selected_val_m} for r in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2vla probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=None, help="backbone dir or id (default: the shipped tiny backbone)")
    parser.add_argument("--layers", default="0,2,4,6", help="hidden-state layers to probe (comma separated)")
    parser.add_argument("--episodes-per-task", type=int, default=80, help="layouts per task (seeds from --seed-offset)")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None,
                        help="render and feed the backbone square frames of this side [px] (default: the camera's "
                             "224; a Qwen2-VL backbone then has (side / 28)^2 image tokens)")
    parser.add_argument("--steps", type=int, default=ProbeConfig.steps)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="probe restarts (the best training fit is reported)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.episodes_per_task < 3:
        parser.error("--episodes-per-task must be >= 3 (layouts are split into train and held-out)")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        cfg = ProbeConfig(steps=args.steps, seeds=seeds)
    except ValueError as exc:
        parser.error(str(exc))
    from m2vla_core.backbone.adapter import FrozenBackbone
    from m2vla_core.backbone.tiny import default_backbone_path

    t0 = time.perf_counter()
    try:
        backbone = FrozenBackbone.from_pretrained(args.backbone or default_backbone_path(), image_size=args.image_size)
    except ValueError as exc:
        parser.error(str(exc))
    images, targets = first_frames(args.episodes_per_task, args.seed_offset, args.image_size)
    grid = int(round(backbone.num_image_tokens_native ** 0.5))
    sources = {"pixels": pixel_tokens(images, grid)}
    with torch.no_grad():
        sources.update({f"layer {k}": v for k, v in backbone_tokens(backbone, images, layers).items()})
    print(f"probe: {len(images)} layouts, {grid}x{grid} tokens, backbone {backbone.backbone_id}", file=sys.stderr)
    report = run_probe(images, targets, sources, cfg, log=lambda s: print(s, file=sys.stderr))
    report.update(backbone=backbone.backbone_id, image_size=backbone.image_size, image_tokens=grid * grid,
                  seconds=time.perf_counter() - t0)
    if args.json:
        from m2vla_core.config_io import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(json.dumps({"mean_baseline_m": report["mean_baseline_m"],
                      "selected_val_m": {s["source"]: s["selected_val_m"] for s in report["sources"]}}))
    return 0
