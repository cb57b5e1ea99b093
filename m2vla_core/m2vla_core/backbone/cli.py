"""``m2vla features``: a LeRobot dataset -> frozen-backbone features -> a training feature dataset.

Each frame t of an episode becomes one sample: the backbone's per-layer hidden states of
(frame t, instruction) under the chosen feature contract, the robot state at t, and the
next H actions ``actions[t : t + H]`` as the target chunk (past the episode end the last
action repeats: the robot holds its final pose). Features go through a ``DiskFeatureCache``
first, so re-running with another chunk length or on an overlapping dataset computes
nothing twice.

The contract (layers, image / text token counts) is fixed here: a head trained on the
dataset reads exactly what was computed, and perception serves the same contract later.

``--object-targets`` stores every object's position (``EpisodeSpec.objects_xy``) as auxiliary
targets (what ``m2vla train --aux-weight`` teaches the head to predict); ``--privileged-state``
puts the named objects' positions in the state instead (a diagnostic head that reads the truth).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

DEFAULT_LAYERS = (0, 2, 4, 6)
DEFAULT_CHUNK_LEN = 16
DEFAULT_IMAGE_TOKENS = 64
DEFAULT_TEXT_TOKENS = 12


def default_cache_dir() -> Path:
    """Shared on-disk feature cache ($M2VLA_FEATURE_CACHE, else ~/.cache/m2vla/features)."""
    env = os.environ.get("M2VLA_FEATURE_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "m2vla" / "features"


@dataclass(frozen=True)
class FeaturesConfig:
    """What ``build_feature_dataset`` computes; validated so a typo fails before minutes of compute."""

    layers: tuple[int, ...] = DEFAULT_LAYERS
    num_image_tokens: int = DEFAULT_IMAGE_TOKENS
    num_text_tokens: int = DEFAULT_TEXT_TOKENS
    chunk_len: int = DEFAULT_CHUNK_LEN
    hidden_dtype: str = "float16"  # storage dtype of the training dataset (features are computed in float32)
    batch_size: int = 16
    max_episodes: int = 0  # 0 = all episodes
    privileged_state: bool = False  # append each episode's named-object positions to the state (a diagnostic)
    object_targets: bool = False  # store every object's x, y as auxiliary training targets (sim recordings only)
    image_size: int = 0  # [px] square frame the backbone sees (Qwen2-VL family); 0 = the backbone's default

    def __post_init__(self) -> None:
        if not self.layers or any(l < 0 for l in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"FeaturesConfig.layers must be strictly increasing non-negative ints, got {self.layers}")
        for name in ("num_image_tokens", "num_text_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeaturesConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_len < 2:
            raise ValueError(f"FeaturesConfig.chunk_len must be >= 2, got {self.chunk_len}")
        if self.hidden_dtype not in ("float16", "float32"):
            raise ValueError(f"FeaturesConfig.hidden_dtype must be float16 or float32, got {self.hidden_dtype!r}")
        if self.max_episodes < 0:
            raise ValueError(f"FeaturesConfig.max_episodes must be >= 0, got {self.max_episodes}")
        if self.image_size < 0:
            raise ValueError(f"FeaturesConfig.image_size must be >= 0 (0 = the backbone's default), got {self.image_size}")


def future_chunks(actions: np.ndarray, chunk_len: int) -> np.ndarray:
    """(T, A) actions -> (T, H, A): row t holds actions t..t+H-1, the last action repeated past the end."""
    actions = np.asarray(actions, dtype=np.float32)
    t = len(actions)
    if t == 0:
        raise ValueError("episode has no actions")
    idx = np.minimum(np.arange(t)[:, None] + np.arange(chunk_len)[None, :], t - 1)  # (T, H)
    return actions[idx]  # (T, H, A)


def named_object_columns(episode) -> np.ndarray:
    """(T, 4) ``EpisodeSpec.named_objects_xy`` of a recorded episode, recomputed from its task and seed."""
    return np.tile(recorded_episode_spec(episode).named_objects_xy().astype(np.float32), (len(episode), 1))


def object_target_columns(episode) -> np.ndarray:
    """(T, 2 * objects) ``EpisodeSpec.objects_xy`` of a recorded episode (NaN: not in its layout)."""
    return np.tile(recorded_episode_spec(episode).objects_xy().astype(np.float32), (len(episode), 1))


def recorded_episode_spec(episode):
    """The ``EpisodeSpec`` of a recorded episode, recomputed from its task and seed.

    Only ``m2vla record`` episodes carry both; the instruction must match the one the seed gives
    today, or the suite changed since the recording and the positions would be another layout's.
    """
    from m2vla_core.sim.tasks import get_task

    if not episode.task or episode.seed is None:
        raise ValueError(f"episode {episode.index}: no m2vla_task / seed in meta/episodes.jsonl; object positions "
                         "(--privileged-state, --object-targets) need episodes recorded by `m2vla record`")
    spec = get_task(episode.task).make_episode(int(episode.seed))
    if spec.instruction != episode.instruction:
        raise ValueError(f"episode {episode.index}: {episode.task} seed {episode.seed} now gives the instruction "
                         f"{spec.instruction!r}, the recording has {episode.instruction!r}: re-record the data")
    return spec


def build_feature_dataset(data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: FeaturesConfig | None = None,
                          *, backbone=None, backbone_path: str | os.PathLike | None = None,
                          cache_dir: str | os.PathLike | None = None, names=None, progress: bool = True,
                          append: bool = False) -> dict:
    """Compute (or read from the disk cache) features of every frame and write a FeatureDataset.

    Returns a summary dict: episodes, samples, computed, cached, out.
    """
    from tqdm import tqdm

    from m2vla_core.backbone.adapter import FrozenBackbone, image_digest
    from m2vla_core.backbone.cache import DiskFeatureCache, feature_key, precompute_features
    from m2vla_core.backbone.tiny import default_backbone_path
    from m2vla_core.instructions import clean_instruction
    from m2vla_core.sim.lerobot_io import _read_jsonl, load_info, load_lerobot_episodes
    from m2vla_core.sim.tasks import OBJECT_XY_NAMES, PRIVILEGED_STATE_NAMES, task_names
    from m2vla_core.training.feature_dataset import FeatureDatasetMeta, FeatureDatasetWriter

    config = config or FeaturesConfig()
    data_dir = Path(data_dir)
    if not (data_dir / "meta" / "info.json").is_file():
        raise FileNotFoundError(f"data {data_dir}: not a LeRobot dataset directory (no meta/info.json)")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # refused before the backbone loads
        raise ValueError(f"out {out_dir} is a file; give a feature dataset directory")
    disk = DiskFeatureCache(cache_dir or default_cache_dir())
    info = load_info(data_dir)
    episode_meta = _read_jsonl(data_dir / "meta" / "episodes.jsonl")
    indices = sorted(int(e["episode_index"]) for e in episode_meta)
    if config.max_episodes:
        indices = indices[: config.max_episodes]
    if not indices:
        raise ValueError(f"{data_dir}: no episodes")
    tasks = list(task_names())
    extra_tasks: list[str] = []  # task names (or instructions) of datasets made elsewhere, in order of appearance
    first = load_lerobot_episodes(data_dir, names, episode_indices=indices[:1])[0]
    state_dim, action_dim = first.states.shape[1], first.actions.shape[1]
    frame_h, frame_w = first.frames.shape[1:3]
    if config.image_size and min(frame_h, frame_w) < config.image_size:
        raise ValueError(f"{data_dir}: frames are {frame_w}x{frame_h} px; an image size of {config.image_size} would "
                         f"only upsample them (record at `m2vla record --image-size {config.image_size}`)")
    if backbone is None:  # after the cheap checks: loading a real VLM takes a while
        backbone = FrozenBackbone.from_pretrained(backbone_path or default_backbone_path(),
                                                  image_size=config.image_size or None)
    contract = replace(backbone.contract(config.layers, num_image_tokens=config.num_image_tokens,
                                         num_text_tokens=config.num_text_tokens), image_size=config.image_size)
    backbone.check_contract(contract)  # a given backbone loaded at another size fails here, not at the first batch
    m2 = info.get("m2vla", {}) if isinstance(info.get("m2vla"), dict) else {}
    if m2.get("interrupted"):
        print(f"m2vla features: {data_dir} is an interrupted recording; using its {info.get('total_episodes')} "
              "finished episodes", file=sys.stderr)
    state_names = tuple(m2.get("state_layout") or ())
    action_names = tuple(m2.get("action_layout") or ())
    fps = float(info.get("fps") or first.fps or 10.0)
    state_names = state_names if len(state_names) == state_dim else ()
    extra_state = PRIVILEGED_STATE_NAMES if config.privileged_state else ()
    if extra_state and not state_names:
        raise ValueError(f"{data_dir}: privileged state needs the recording's state names (meta/info.json m2vla)")
    meta = FeatureDatasetMeta(contract=contract, state_dim=state_dim + len(extra_state), action_space="joint",
                              action_dim=action_dim, chunk_len=config.chunk_len, dt_s=1.0 / fps,
                              backbone_id=backbone.backbone_id, backbone_digest=backbone.weights_digest,
                              hidden_dtype=config.hidden_dtype, state_names=(*state_names, *extra_state),
                              action_names=action_names if len(action_names) == action_dim else (),
                              task_names=tuple(tasks),
                              aux_target_names=OBJECT_XY_NAMES if config.object_targets else ())
    writer = FeatureDatasetWriter(out_dir, meta, append=append)
    # Episode indices restart at 0 in every recorded dataset: appended ones are shifted past the
    # existing ones, or the episode split and the skill memory's same-episode exclusion would
    # treat two different demonstrations as one.
    episode_offset = writer.next_episode_index
    summary = {"episodes": 0, "samples": 0, "computed": 0, "cached": 0, "out": str(out_dir),
               "episode_offset": episode_offset}
    bar = tqdm(total=len(indices), unit="ep", desc="features", disable=not progress, dynamic_ncols=True)

    def episodes():  # the first one was read above for the dimensions: not decoded twice
        yield first
        for later in indices[1:]:
            yield load_lerobot_episodes(data_dir, names, episode_indices=[later])[0]

    try:
        for index, ep in zip(indices, episodes()):
            if ep.states.shape[1] != state_dim or ep.actions.shape[1] != action_dim:
                raise ValueError(f"episode {index}: state/action dims {ep.states.shape[1]}/{ep.actions.shape[1]} differ "
                                 f"from the first episode's {state_dim}/{action_dim}")
            if len(ep) == 0:
                continue
            text = clean_instruction(ep.instruction)
            counts = precompute_features(backbone, ((frame, text) for frame in ep.frames), contract, disk,
                                         batch_size=config.batch_size)
            summary["computed"] += counts["computed"]
            summary["cached"] += counts["cached"]
            bundles = [disk.get(feature_key(image_digest(frame), text, backbone.feature_identity, contract))
                       for frame in ep.frames]
            if any(b is None for b in bundles):
                raise RuntimeError(f"episode {index}: features missing from the cache right after computing them")
            hidden = np.stack([b.hidden.float().numpy() for b in bundles])  # (T, n_layers, tokens, D)
            mask = np.stack([b.mask.numpy() for b in bundles])  # (T, tokens)
            task = ep.task or text
            if task in tasks:
                task_index = tasks.index(task)
            else:
                if task not in extra_tasks:
                    extra_tasks.append(task)
                task_index = len(tasks) + extra_tasks.index(task)
            n = len(ep)
            states = np.hstack([ep.states, named_object_columns(ep)]) if extra_state else ep.states  # (T, S)
            writer.add(hidden, mask, states, future_chunks(ep.actions, config.chunk_len),
                       np.full(n, index + episode_offset, dtype=np.int64), np.full(n, task_index, dtype=np.int64),
                       aux_targets=object_target_columns(ep) if config.object_targets else None)
            summary["episodes"] += 1
            summary["samples"] += n
            bar.update(1)
            bar.set_postfix(frames=summary["samples"], computed=summary["computed"], refresh=False)
    finally:
        bar.close()
        if extra_tasks:
            writer.meta = replace(writer.meta, task_names=tuple(tasks + extra_tasks))
        writer.close()
    return summary


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--layers must be comma-separated ints, got {text!r}") from None


def features_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="m2vla features", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="LeRobot v2.x dataset directory (e.g. from `m2vla record`)")
    p.add_argument("--out", required=True, help="feature dataset directory to create")
    p.add_argument("--backbone", default="", help="backbone dir or hub id (default: the shipped tiny backbone)")
    p.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)), help="hidden-state indices, e.g. 0,2,4,6")
    p.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS, help="image tokens per layer (pooled)")
    p.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="instruction tokens per layer")
    p.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK_LEN, help="H future actions per sample")
    p.add_argument("--hidden-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--cache", default="", help=f"disk feature cache (default {default_cache_dir()})")
    p.add_argument("--max-episodes", type=int, default=0, help="use only the first N episodes (0 = all)")
    p.add_argument("--image-key", default="", help="LeRobot feature holding the camera image")
    p.add_argument("--state-key", default="", help="LeRobot feature holding the joint state")
    p.add_argument("--action-key", default="", help="LeRobot feature holding the action")
    p.add_argument("--append", action="store_true", help="add to an existing feature dataset with the same meta")
    p.add_argument("--image-size", type=int, default=0,
                   help="[px] square frame the backbone sees (Qwen2-VL family; 0 = its default); the head's contract "
                        "carries it, so eval and the perception node load the backbone at the same size")
    p.add_argument("--privileged-state", action="store_true",
                   help="append the named objects' true x, y to the state: the head then needs them at run "
                        "time, from the simulator (m2vla eval) or from an object localiser beside it (m2vla localiser)")
    p.add_argument("--object-targets", action="store_true",
                   help="store every object's true x, y as auxiliary targets, for a head trained with "
                        "aux_weight > 0 (`m2vla train --aux-weight`); the head never reads them")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from m2vla_core.sim.lerobot_io import FeatureNames

        names = FeatureNames(**{k: v for k, v in (("image", args.image_key), ("state", args.state_key),
                                                  ("action", args.action_key)) if v})
        config = FeaturesConfig(layers=_parse_layers(args.layers), num_image_tokens=args.image_tokens,
                                num_text_tokens=args.text_tokens, chunk_len=args.chunk_len,
                                hidden_dtype=args.hidden_dtype, max_episodes=args.max_episodes,
                                privileged_state=args.privileged_state, object_targets=args.object_targets,
                                image_size=args.image_size)
        summary = build_feature_dataset(args.data, args.out, config, backbone_path=args.backbone or None,
                                        cache_dir=args.cache or None, names=names, progress=not args.no_progress,
                                        append=args.append)
    except (ValueError, KeyError, OSError) as exc:
        print(f"m2vla features: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['samples']} samples from {summary['episodes']} episodes to {summary['out']} "
          f"({summary['computed']} frames computed, {summary['cached']} from the cache)")
    return 0
