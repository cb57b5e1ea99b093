"""``m2vla localiser``: fit the object localiser (``heads.localiser``) on first frames of the suite.

Labels come from the simulator's layouts: every object's table x, y and which two the
instruction names. First frames only (arm at home, nothing occluded, nothing moved yet): the
localiser is asked once per episode, at its start, so that is the frame it must read, and
rendering a layout costs a reset instead of a whole demonstration.

The position fit alone is not convex: a spatial softmax can stall at the mean (every restart
did, on the 12 objects of 3840 layouts at 448 px). So the detector is also told which image
token each object falls on (the simulator camera's projection of the object, a cross-entropy
over the tokens), and the fit restarts from several seeds and keeps the one with the best
*training* fit; held-out layouts only report.
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

from m2vla_core.heads.localiser import LocaliserConfig, ObjectLocaliser, pick_named

FRAMES_FORMAT = "m2vla-localiser-frames"


@dataclass(frozen=True)
class LocaliserFitConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    restarts: tuple[int, ...] = (0, 1, 2)
    val_fraction: float = 0.2  # of layouts
    token_weight: float = 0.1  # x cross-entropy of each object's detector scores vs the token it falls on

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"LocaliserFitConfig steps/batch_size must be >= 1, got {self.steps}/{self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"LocaliserFitConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.restarts:
            raise ValueError("LocaliserFitConfig.restarts must not be empty")
        if not self.token_weight >= 0.0:
            raise ValueError(f"LocaliserFitConfig.token_weight must be >= 0, got {self.token_weight}")


@dataclass
class FirstFrames:
    """First frames of N layouts as the localiser reads them, with their labels."""

    image_tokens: torch.Tensor  # (N, T_img, D)
    text_tokens: torch.Tensor  # (N, T_txt, D)
    objects_xy: torch.Tensor  # (N, K, 2) [m], NaN where the layout has no such object
    cube_index: torch.Tensor  # (N,) into object_keys
    target_index: torch.Tensor  # (N,) into object_keys, K = the cube itself

    def __len__(self) -> int:
        return len(self.objects_xy)

    def save(self, path: str | Path, meta: dict[str, str]) -> None:
        from m2vla_core.heads.checkpoint import atomic_save_safetensors

        atomic_save_safetensors(dict(vars(self)), Path(path), {"format": FRAMES_FORMAT, **meta})

    @classmethod
    def load(cls, path: str | Path) -> tuple["FirstFrames", dict[str, str]]:
        from safetensors import safe_open

        from m2vla_core.heads.checkpoint import CheckpointError, check_safetensors_file

        check_safetensors_file(Path(path))
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FRAMES_FORMAT:
                raise CheckpointError(f"{path}: not a localiser frames file (format {meta.get('format')!r})")
            missing = sorted(set(cls.__dataclass_fields__) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path}: missing tensors {missing}")
            frames = cls(**{name: f.get_tensor(name) for name in cls.__dataclass_fields__})
        n, k = frames.objects_xy.shape[:2]
        if not (len(frames.image_tokens) == len(frames.text_tokens) == len(frames.cube_index)
                == len(frames.target_index) == n) or not (
                bool(((frames.cube_index >= 0) & (frames.cube_index < k)).all())
                and bool(((frames.target_index >= 0) & (frames.target_index <= k)).all())):
            raise CheckpointError(f"{path}: inconsistent tensors (sample counts or object indices)")
        return frames, meta


def gather_first_frames(backbone, tasks: list[str], episodes_per_task: int, seed_offset: int, layer: int,
                        num_text_tokens: int, progress: bool = True) -> FirstFrames:
    """Render each task x seed's first frame at the backbone's input size and read its tokens."""
    from m2vla_core.sim import SimConfig, TaskEnv
    from m2vla_core.sim.tasks import object_keys

    keys = object_keys()
    contract = backbone.contract([layer], num_text_tokens=num_text_tokens)
    n_img = contract.num_image_tokens
    images, texts, xy, cube, target = [], [], [], [], []
    sim = SimConfig(image_width=backbone.image_size, image_height=backbone.image_size)
    total = len(tasks) * episodes_per_task
    with TaskEnv(sim) as env, torch.no_grad():
        for task in tasks:
            for seed in range(seed_offset, seed_offset + episodes_per_task):
                obs = env.reset(task, seed)
                hidden = backbone.extract(obs.image, obs.instruction, contract).hidden[0].float().cpu()  # (T, D)
                if not bool(torch.isfinite(hidden).all()):
                    raise ValueError(f"{task} seed {seed}: the backbone's features are not finite")
                images.append(hidden[:n_img].to(torch.float16))  # half the memory; the tiny backbone's
                texts.append(hidden[n_img:].to(torch.float16))  # layer 0 is far inside float16's range
                xy.append(torch.as_tensor(env.spec.objects_xy(), dtype=torch.float32).view(len(keys), 2))
                cube_key, target_key = env.spec.named_object_keys()
                cube.append(keys.index(cube_key))
                target.append(len(keys) if target_key == cube_key else keys.index(target_key))
                if progress and len(xy) % 100 == 0:
                    print(f"localiser: {len(xy)}/{total} first frames", file=sys.stderr)
    return FirstFrames(torch.stack(images), torch.stack(texts), torch.stack(xy),
                       torch.as_tensor(cube), torch.as_tensor(target))


OBJECT_CENTRE_Z_M = 0.02  # [m] about where a cube's centre, a zone and a tray floor sit above the table


def object_tokens(objects_xy: torch.Tensor, side: int, camera=None) -> torch.Tensor:
    """(N, K, 2) table x, y [m] -> (N, K) index of the image token (row-major on a side x side
    grid over the square frame) each object falls on in the fixed camera (the simulator's default
    one, which ``gather_first_frames`` renders with); -1 where absent."""
    from m2vla_core.sim.scene import CameraConfig

    xy = objects_xy.reshape(-1, 2).double().numpy()
    points = np.concatenate([xy, np.full((len(xy), 1), OBJECT_CENTRE_Z_M)], axis=1)
    uv = (camera or CameraConfig()).project(np.nan_to_num(points))  # (N * K, 2)
    cells = np.clip(np.floor(uv * side), 0, side - 1).astype(np.int64)
    index = cells[:, 1] * side + cells[:, 0]  # row (v) major
    index[np.isnan(xy[:, 0])] = -1
    return torch.as_tensor(index).view(objects_xy.shape[:2])


def _distances(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    present = ~torch.isnan(target[..., 0])
    return (pred - torch.nan_to_num(target)).norm(dim=-1)[present]


@torch.no_grad()
def score(model: ObjectLocaliser, frames: FirstFrames, idx: torch.Tensor) -> dict[str, float]:
    """Median errors [m] on layouts ``idx`` (and the named cube's 90th percentile): every object,
    and the named cube / target as the localiser picks and reads them (so a wrong pick counts);
    and how often it picks the right ones."""
    objects, cube_logits, target_logits = model(frames.image_tokens[idx], frames.text_tokens[idx],
                                                peak_radius=model.config.peak_radius)  # as it will be read
    named = pick_named(objects, cube_logits.argmax(-1), target_logits.argmax(-1)).view(-1, 2, 2)
    truth = pick_named(frames.objects_xy[idx], frames.cube_index[idx], frames.target_index[idx]).view(-1, 2, 2)
    named_err = (named - truth).norm(dim=-1)  # (n, 2)
    return {"objects_median_m": float(_distances(objects, frames.objects_xy[idx]).median()),
            "cube_median_m": float(named_err[:, 0].median()), "target_median_m": float(named_err[:, 1].median()),
            "cube_p90_m": float(named_err[:, 0].quantile(0.9)),
            "cube_pick_accuracy": float((cube_logits.argmax(-1) == frames.cube_index[idx]).float().mean()),
            "target_pick_accuracy": float((target_logits.argmax(-1) == frames.target_index[idx]).float().mean())}


def fit_once(config: LocaliserConfig, frames: FirstFrames, train: torch.Tensor, fit: LocaliserFitConfig,
             seed: int) -> ObjectLocaliser:
    side = int(round(config.num_image_tokens ** 0.5))
    tokens = object_tokens(frames.objects_xy, side)  # (N, K)
    torch.manual_seed(seed)
    model = ObjectLocaliser(config)
    model.set_feature_stats(frames.image_tokens[train], frames.text_tokens[train])
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    rng = np.random.default_rng(seed)
    for _ in range(fit.steps):
        idx = train[torch.as_tensor(rng.integers(len(train), size=fit.batch_size))]
        objects, cube_logits, target_logits, scores = model(frames.image_tokens[idx], frames.text_tokens[idx],
                                                            with_scores=True)
        token_loss = torch.nn.functional.cross_entropy(scores.transpose(1, 2).flatten(0, 1), tokens[idx].flatten(),
                                                       ignore_index=-1)  # (B * K, T) scores vs each object's token
        loss = (_distances(objects, frames.objects_xy[idx]).square().mean() + fit.token_weight * token_loss
                + torch.nn.functional.cross_entropy(cube_logits, frames.cube_index[idx])
                + torch.nn.functional.cross_entropy(target_logits, frames.target_index[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def fit_localiser(config: LocaliserConfig, frames: FirstFrames, fit: LocaliserFitConfig,
                  log=print) -> tuple[ObjectLocaliser, dict]:
    """Fit from each restart seed, keep the best training fit of the named cube and target (a
    wrong pick counts); report every restart."""
    from m2vla_core.evaluation.probe import split_layouts

    train, val = (torch.as_tensor(i) for i in split_layouts(len(frames), fit.val_fraction))
    best, best_fit, runs = None, float("inf"), []
    for seed in fit.restarts:
        model = fit_once(config, frames, train, fit, seed)
        run = {"seed": seed, "train": score(model, frames, train), "val": score(model, frames, val)}
        runs.append(run)
        log(f"restart {seed}: named cube held-out {run['val']['cube_median_m'] * 100:.1f} cm "
            f"(train {run['train']['cube_median_m'] * 100:.1f} cm), every object held-out "
            f"{run['val']['objects_median_m'] * 100:.1f} cm, picks cube {run['val']['cube_pick_accuracy']:.0%} "
            f"target {run['val']['target_pick_accuracy']:.0%}")
        train_fit = run["train"]["cube_median_m"] + run["train"]["target_median_m"]
        if best is None or train_fit < best_fit:
            best, best_fit, chosen = model, train_fit, run
    report = {"fit": asdict(fit), "layouts": {"train": len(train), "val": len(val)}, "selected": chosen,
              "restarts": runs, "peak_radius": config.peak_radius}  # how the errors were read
    return best, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2vla localiser", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for localiser.json + localiser.safetensors (a head checkpoint directory "
                             "puts it beside the head: its privileged-state entries then come from the camera)")
    parser.add_argument("--backbone", default=None, help="backbone dir or id (default: the shipped tiny backbone)")
    parser.add_argument("--tasks", default="all", help="'all' or comma-separated task names")
    parser.add_argument("--episodes-per-task", type=int, default=640, help="layouts per task (seeds from --seed-offset)")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=448, help="[px] square frames the localiser reads")
    parser.add_argument("--layer", type=int, default=0, help="hidden-state layer it reads")
    parser.add_argument("--text-tokens", type=int, default=12, help="instruction tokens it reads")
    parser.add_argument("--steps", type=int, default=LocaliserFitConfig.steps)
    parser.add_argument("--restarts", default="0,1,2", help="fit seeds (the best training fit is kept)")
    parser.add_argument("--token-weight", type=float, default=LocaliserFitConfig.token_weight,
                        help="weight of the which-token cross-entropy (0: positions alone)")
    parser.add_argument("--peak-radius", type=int, default=None,
                        help="read each object near its best token, within this many rows / columns (default: 1, "
                             "or -1 = every token with --token-weight 0, whose detector is not trained to peak)")
    parser.add_argument("--context", type=int, default=0,
                        help="k x k token neighbourhood the detector also sees (0: each token alone; odd k)")
    parser.add_argument("--frames", type=Path, default=None,
                        help="safetensors cache of the first frames' tokens: read if it exists, else written")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from m2vla_core.sim.tasks import object_keys, parse_task_list

    try:
        tasks = parse_task_list(args.tasks)
        fit = LocaliserFitConfig(steps=args.steps, restarts=tuple(int(x) for x in args.restarts.split(",") if x.strip()),
                                 token_weight=args.token_weight)
    except ValueError as exc:
        parser.error(str(exc))
    if args.episodes_per_task < 3:
        parser.error("--episodes-per-task must be >= 3 (layouts are split into train and held-out)")
    from m2vla_core.evaluation.cli import DEFAULT_SEED_OFFSET

    if args.seed_offset < 0 or args.seed_offset + args.episodes_per_task > DEFAULT_SEED_OFFSET:
        parser.error(f"seeds {args.seed_offset}..{args.seed_offset + args.episodes_per_task - 1} must stay below "
                     f"{DEFAULT_SEED_OFFSET}, where evaluation's held-out seeds start")
    from m2vla_core.backbone.adapter import FrozenBackbone
    from m2vla_core.backbone.tiny import default_backbone_path

    t0 = time.perf_counter()
    try:
        backbone = FrozenBackbone.from_pretrained(args.backbone or default_backbone_path(), image_size=args.image_size)
        contract = backbone.contract([args.layer], num_text_tokens=args.text_tokens)
        config = LocaliserConfig(backbone_id=backbone.backbone_id, backbone_digest=backbone.weights_digest,
                                 object_keys=object_keys(), image_size=backbone.image_size, layer=args.layer,
                                 num_image_tokens=contract.num_image_tokens, num_text_tokens=args.text_tokens,
                                 width=backbone.hidden_size, context=args.context,
                                 peak_radius=args.peak_radius if args.peak_radius is not None
                                 else (1 if args.token_weight > 0 else -1))
    except ValueError as exc:
        parser.error(str(exc))
    meta = {"backbone_id": backbone.backbone_id, "backbone_digest": backbone.weights_digest,
            "image_size": str(backbone.image_size), "layer": str(args.layer), "text_tokens": str(args.text_tokens),
            "tasks": ",".join(tasks), "episodes_per_task": str(args.episodes_per_task),
            "seed_offset": str(args.seed_offset), "object_keys": ",".join(object_keys())}
    if args.frames is not None and args.frames.is_file():
        frames, cached = FirstFrames.load(args.frames)
        if {k: cached.get(k) for k in meta} != meta:
            parser.error(f"{args.frames} was gathered with other settings ({cached}); delete it or pass another path")
    else:
        frames = gather_first_frames(backbone, tasks, args.episodes_per_task, args.seed_offset, args.layer,
                                     args.text_tokens, progress=not args.no_progress)
        if args.frames is not None:
            frames.save(args.frames, meta)
    print(f"localiser: {len(frames)} layouts, {config.num_image_tokens} image tokens at {config.image_size} px",
          file=sys.stderr)
    model, report = fit_localiser(config, frames, fit, log=lambda s: print(s, file=sys.stderr))
    from m2vla_core.config_io import atomic_write_text
    from m2vla_core.heads.localiser import save_localiser

    save_localiser(model, args.out)
    report.update(seconds=time.perf_counter() - t0, layouts_total=len(frames))
    atomic_write_text(args.out / "localiser_fit.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps({"named_cube_val_median_m": report["selected"]["val"]["cube_median_m"],
                      "named_target_val_median_m": report["selected"]["val"]["target_median_m"]}))
    return 0
