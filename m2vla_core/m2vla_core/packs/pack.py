"""Make a skill pack: a head trained on one task family alone, plus what a router needs.

Because the backbone is frozen, a pack never touches anything shared: it is an ordinary head
checkpoint (``config.json`` + ``model.safetensors`` [+ ``model.onnx``]) trained by the normal
trainer on a task-filtered copy of the feature dataset, with two files added:
``pack.json`` (``PackInfo``) and ``router_examples.safetensors`` (pooled features of the
first frames of its own episodes).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from m2vla_core.config_io import save_json
from m2vla_core.heads.checkpoint import (CheckpointError, atomic_save_safetensors, check_safetensors_file, load_config_file,
                                        load_head_config)
from m2vla_core.packs.configuration_packs import PACK_INFO_NAME, ROUTER_EXAMPLES_NAME, PackInfo
from m2vla_core.packs.router import pool_features
from m2vla_core.training.feature_dataset import DatasetError, FeatureDataset, FeatureDatasetWriter

FILTER_NAME = "filter.json"  # written beside a filtered dataset: source + tasks, so it can be reused
EXAMPLE_KEYS = ("pooled", "episode_index", "task_index")


def task_indices(meta, tasks) -> list[int]:
    """Task names -> indices in the dataset's ``task_names`` (strict, with the known names)."""
    known = list(meta.task_names)
    missing = [t for t in tasks if t not in known]
    if missing:
        raise DatasetError(f"tasks {missing} are not in this dataset; it has {known}")
    return [known.index(t) for t in tasks]


def filter_feature_dataset(source: str | os.PathLike | FeatureDataset, out_dir: str | os.PathLike, tasks,
                           *, shard_size: int = 2048) -> FeatureDataset:
    """Copy the samples of ``tasks`` into a new feature dataset (same meta, same indices).

    Reuses ``out_dir`` when it already holds the same filter of the same source.
    """
    tasks = tuple(tasks)
    out = Path(out_dir)
    src_path = str(source.path if isinstance(source, FeatureDataset) else Path(source))
    record = {"source": os.path.abspath(src_path), "tasks": list(tasks)}
    if (out / FILTER_NAME).is_file() and json.loads((out / FILTER_NAME).read_text(encoding="utf-8")) == record:
        return FeatureDataset(out)
    ds = source if isinstance(source, FeatureDataset) else FeatureDataset(source)
    keep = np.nonzero(np.isin(ds.task_index, task_indices(ds.meta, tasks)))[0]
    if len(keep) == 0:
        raise DatasetError(f"{src_path}: no samples of tasks {list(tasks)}")
    with FeatureDatasetWriter(out, replace(ds.meta), shard_size=shard_size) as writer:
        for start in range(0, len(keep), shard_size):
            idx = torch.as_tensor(keep[start:start + shard_size])
            writer.add(ds.hidden[idx], ds.mask[idx], ds.state[idx], ds.actions[idx],
                       ds.episode_index[idx.numpy()], ds.task_index[idx.numpy()],
                       aux_targets=None if ds.aux_targets is None else ds.aux_targets[idx])
    (out / FILTER_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return FeatureDataset(out)


def first_frame_indices(episode_index: np.ndarray, frames_per_episode: int = 1) -> np.ndarray:
    """Indices of the first ``frames_per_episode`` samples of every episode (samples are in frame order)."""
    episode_index = np.asarray(episode_index)
    picked = []
    for ep in np.unique(episode_index):
        picked.extend(np.nonzero(episode_index == ep)[0][:frames_per_episode].tolist())
    return np.asarray(sorted(picked), dtype=np.int64)


def router_examples(dataset: FeatureDataset, tasks, frames_per_episode: int = 1) -> dict[str, torch.Tensor]:
    """Pooled (N, L, 2, D) first-observation features of ``tasks``' episodes + their episode / task indices."""
    keep_task = np.isin(dataset.task_index, task_indices(dataset.meta, tasks))
    rows = np.nonzero(keep_task)[0]
    idx = rows[first_frame_indices(dataset.episode_index[rows], frames_per_episode)]
    if len(idx) == 0:
        raise DatasetError(f"{dataset.path}: no episodes of tasks {list(tasks)} for router examples")
    b = dataset.batch(idx)
    pooled = pool_features(b["hidden"], b["mask"], dataset.meta.contract.num_image_tokens)  # (N, L, 2, D)
    return {"pooled": pooled.contiguous(), "episode_index": b["episode_index"], "task_index": b["task_index"]}


def write_pack_files(checkpoint: str | os.PathLike, name: str, tasks, dataset: FeatureDataset,
                     frames_per_episode: int = 1) -> PackInfo:
    """Turn a trained head checkpoint into a pack: add ``pack.json`` + router examples of ``tasks``."""
    ckpt = Path(checkpoint)
    config = load_head_config(ckpt)
    meta = dataset.meta
    if config.contract != meta.contract or config.backbone_digest != meta.backbone_digest:
        raise CheckpointError(f"{ckpt}: head was trained on other features than {dataset.path}")
    examples = router_examples(dataset, tasks, frames_per_episode)
    keep = np.isin(dataset.task_index, task_indices(meta, tasks))
    info = PackInfo(name=name, tasks=tuple(tasks), num_episodes=int(len(np.unique(dataset.episode_index[keep]))),
                    num_samples=int(keep.sum()), router_frames_per_episode=frames_per_episode,
                    source=str(dataset.path))
    atomic_save_safetensors(examples, ckpt / ROUTER_EXAMPLES_NAME, {"format": "m2vla-router-examples", "version": "1"})
    save_json(info, ckpt / PACK_INFO_NAME)
    return info


def load_pack_info(pack_dir: str | os.PathLike) -> PackInfo:
    return load_config_file(PackInfo, Path(pack_dir) / PACK_INFO_NAME,
                            f"{pack_dir}: no {PACK_INFO_NAME}; not a skill pack (make one with `m2vla pack train`)")


def load_router_examples(pack_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(pack_dir) / ROUTER_EXAMPLES_NAME
    if not path.is_file():
        raise CheckpointError(f"{pack_dir}: no {ROUTER_EXAMPLES_NAME}")
    check_safetensors_file(path)
    tensors = load_file(str(path))
    if set(tensors) != set(EXAMPLE_KEYS):
        raise CheckpointError(f"{path}: expected tensors {EXAMPLE_KEYS}, got {sorted(tensors)}")
    n = tensors["pooled"].shape[0]
    if tensors["pooled"].dim() != 4 or tensors["pooled"].shape[2] != 2 or any(tensors[k].shape != (n,) for k in EXAMPLE_KEYS[1:]):
        raise CheckpointError(f"{path}: pooled (N, L, 2, D) and (N,) indices expected")
    return tensors


def train_pack(data: str | os.PathLike | FeatureDataset, out_dir: str | os.PathLike, name: str, tasks, run=None, *,
               work_dir: str | os.PathLike | None = None, frames_per_episode: int = 1, export: bool = True,
               progress: bool = False) -> PackInfo:
    """Train a head on ``tasks`` alone (the normal trainer on a filtered dataset) and save it as a pack.

    The filtered dataset goes to ``work_dir`` (default ``<out_dir>.data``) and is reused when
    it already holds the same filter. ``export`` also writes model.onnx (the onnxruntime backend).
    """
    from m2vla_core.training.trainer import train

    tasks = tuple(tasks)
    PackInfo(name=name, tasks=tasks)  # validate the name and tasks before minutes of work
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".data")
    subset = filter_feature_dataset(data, work, tasks)
    train(subset.path, out, run, progress=progress, plot=False)
    if export:
        from m2vla_core.export.onnx_export import export_onnx

        result = export_onnx(out)
        if not result.ok:
            raise RuntimeError(f"{out}: ONNX export failed parity ({result.max_abs_error})")
    return write_pack_files(out, name, tasks, subset, frames_per_episode)
