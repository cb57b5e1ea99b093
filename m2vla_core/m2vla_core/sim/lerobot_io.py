"""Write and read datasets in the LeRobot v2.1 layout, with pyarrow + PIL only.

Layout (one parquet file per episode, images stored *inside* the parquet as PNG bytes, the
``"image"`` feature dtype of LeRobot, so no video codec / ffmpeg / torchvision is needed to
write or read, and frames round-trip bit-exactly)::

    meta/info.json            codebase_version "v2.1", fps, features, path templates, totals
    meta/tasks.jsonl          {"task_index", "task"}            (LeRobot "task" = instruction text)
    meta/episodes.jsonl       {"episode_index", "tasks", "length", + ours: "m2vla_task", "seed", "success"}
    meta/episodes_stats.jsonl {"episode_index", "stats": {feature: {min, max, mean, std, count}}}
    meta/stats.json           the same statistics over the whole dataset
    data/chunk-000/episode_000000.parquet

Image columns are structs ``{bytes: binary, path: string}`` and the parquet schema carries the
Hugging Face ``datasets`` feature metadata, so ``LeRobotDataset`` / ``datasets`` decode them as
images. The reader also accepts datasets made elsewhere with other feature names (map them
with ``FeatureNames``) and image features stored as files (``path``); ``"video"`` features are
read only when PyAV is importable.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CODEBASE_VERSION = "v2.1"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


@dataclass(frozen=True)
class FeatureNames:
    """Which LeRobot feature holds what. "" disables an optional feature (wrist image, ee pose)."""

    image: str = "observation.images.front"
    state: str = "observation.state"
    action: str = "action"
    wrist_image: str = "observation.images.wrist"
    ee_pose: str = "observation.ee_pose"

    def __post_init__(self) -> None:
        for name in ("image", "state", "action"):
            if not getattr(self, name):
                raise ValueError(f"FeatureNames.{name} must name a feature, got {getattr(self, name)!r}")


@dataclass
class Episode:
    """One demonstration, frame t pairs observation t with the action taken from it."""

    instruction: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    states: np.ndarray  # (T, S) float32
    actions: np.ndarray  # (T, A) float32
    fps: float
    task: str = ""  # m2vla task name ("" for datasets made elsewhere)
    seed: int | None = None
    success: bool | None = None
    index: int = -1  # episode_index in the dataset
    wrist_frames: np.ndarray | None = None  # (T, H, W, 3) uint8
    ee_poses: np.ndarray | None = None  # (T, 7) float32
    timestamps: np.ndarray | None = None  # (T,) float32 [s]

    def __post_init__(self) -> None:
        t = len(self.frames)
        for name in ("states", "actions", "wrist_frames", "ee_poses", "timestamps"):
            value = getattr(self, name)
            if value is not None and len(value) != t:
                raise ValueError(f"Episode.{name} has {len(value)} rows but frames has {t}")
        if t and (self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3):
            raise ValueError(f"Episode.frames must be (T, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")

    def __len__(self) -> int:
        return len(self.frames)


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # lossless; level 1 = fast
    return buf.getvalue()


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def _stats(x: np.ndarray, image: bool = False) -> dict[str, Any]:
    """LeRobot-style stats; images are per channel in [0, 1] with shape (3, 1, 1)."""
    if image:
        x = x[:: max(1, len(x) // 20)].astype(np.float64) / 255.0  # (t, H, W, 3): every k-th frame is enough
        axes = (0, 1, 2)
        shape = lambda v: v.reshape(3, 1, 1).tolist()  # noqa: E731 - (3,) -> (3, 1, 1)
    else:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)  # (T, D)
        axes = (0,)
        shape = lambda v: v.tolist()  # noqa: E731
    return {"min": shape(x.min(axis=axes)), "max": shape(x.max(axis=axes)), "mean": shape(x.mean(axis=axes)),
            "std": shape(x.std(axis=axes)), "count": [int(len(x))]}


class LeRobotWriter:
    """Append episodes to a new LeRobot v2.1 dataset directory.

    An episode's line in meta/episodes.jsonl is its commit: the loader reads the episodes listed
    there. The metadata (info.json, tasks.jsonl, stats.json) is rewritten, atomically, after every
    commit, so a recording killed outright (SIGKILL, power loss) stays readable, its totals at most
    the one episode being committed behind; ``close()`` rewrites it over the committed episodes read
    back from disk, so a Ctrl-C anywhere in ``add_episode`` leaves info.json agreeing with what the
    loader reads. With ``extra_info``, info.json's "m2vla" record also lists the committed
    episodes' seeds per task under "seeds" (tasks already named there keep their entry)."""

    def __init__(self, root: str | Path, fps: float, image_shape: tuple[int, int, int], state_names: list[str],
                 action_names: list[str], names: FeatureNames | None = None, robot_type: str = "franka_panda",
                 wrist_image: bool = False, ee_pose: bool = True, extra_info: dict[str, Any] | None = None,
                 overwrite: bool = False) -> None:
        import pyarrow as pa

        self.root = Path(root)
        if (self.root / "meta" / "info.json").exists() and not overwrite:
            raise FileExistsError(f"{self.root} already holds a dataset (meta/info.json); choose another --out")
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        for stale in ("episodes.jsonl", "episodes_stats.jsonl", "tasks.jsonl", "info.json", "stats.json"):
            (self.root / "meta" / stale).unlink(missing_ok=True)
        self.fps = float(fps)
        self.names = names or FeatureNames()
        self.robot_type = robot_type
        self.extra_info = dict(extra_info or {})
        h, w, c = image_shape
        img = {"dtype": "image", "shape": [h, w, c], "names": ["height", "width", "channel"]}
        self.features: dict[str, dict[str, Any]] = {self.names.image: dict(img)}
        if wrist_image:
            self.features[self.names.wrist_image] = dict(img)
        self.features[self.names.state] = {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)}
        self.features[self.names.action] = {"dtype": "float32", "shape": [len(action_names)],
                                            "names": list(action_names)}
        if ee_pose:
            self.features[self.names.ee_pose] = {"dtype": "float32", "shape": [7],
                                                 "names": ["x", "y", "z", "qx", "qy", "qz", "qw"]}
        for col, dtype in zip(INDEX_COLUMNS, ("float32", "int64", "int64", "int64", "int64")):
            self.features[col] = {"dtype": dtype, "shape": [1], "names": None}
        self._image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        self._tasks: dict[str, int] = {}
        self._episodes = 0
        self._frames = 0
        self._committed: list[dict[str, Any]] = []
        self._stats: dict[int, dict[str, Any]] = {}

    def _hf_features(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, ft in self.features.items():
            if ft["dtype"] == "image":
                out[key] = {"_type": "Image"}
            elif key in INDEX_COLUMNS:
                out[key] = {"dtype": ft["dtype"], "_type": "Value"}
            else:
                out[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": ft["shape"][0],
                            "_type": "Sequence"}
        return out

    def add_episode(self, ep: Episode) -> int:
        """Write one episode's parquet file now; returns its episode_index."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = len(ep)
        if t == 0:
            raise ValueError("cannot write an empty episode")
        if ep.wrist_frames is None and self.names.wrist_image in self.features:
            raise ValueError("this dataset has a wrist image feature but the episode has no wrist_frames")
        index = self._episodes
        task_index = self._tasks.setdefault(ep.instruction, len(self._tasks))
        timestamps = (ep.timestamps if ep.timestamps is not None else np.arange(t) / self.fps).astype(np.float32)
        columns: dict[str, pa.Array] = {}
        stats: dict[str, Any] = {}
        image_sources = {self.names.image: ep.frames}
        if self.names.wrist_image in self.features:
            image_sources[self.names.wrist_image] = ep.wrist_frames
        for key, frames in image_sources.items():
            columns[key] = pa.array([{"bytes": _encode_png(f), "path": None} for f in frames], type=self._image_type)
            stats[key] = _stats(np.asarray(frames), image=True)
        vectors = {self.names.state: ep.states, self.names.action: ep.actions}
        if self.names.ee_pose in self.features:
            if ep.ee_poses is None:
                raise ValueError("this dataset has an ee pose feature but the episode has no ee_poses")
            vectors[self.names.ee_pose] = ep.ee_poses
        for key, values in vectors.items():
            values = np.asarray(values, dtype=np.float32)  # (T, D)
            if values.shape != (t, self.features[key]["shape"][0]):
                raise ValueError(f"{key}: expected shape ({t}, {self.features[key]['shape'][0]}), got {values.shape}")
            columns[key] = pa.array(list(values), type=pa.list_(pa.float32()))
            stats[key] = _stats(values)
        index_values = {"timestamp": timestamps, "frame_index": np.arange(t, dtype=np.int64),
                        "episode_index": np.full(t, index, dtype=np.int64),
                        "index": np.arange(self._frames, self._frames + t, dtype=np.int64),
                        "task_index": np.full(t, task_index, dtype=np.int64)}
        for key, values in index_values.items():
            columns[key] = pa.array(values)
            stats[key] = _stats(values)
        table = pa.table(columns)
        hf = json.dumps({"info": {"features": self._hf_features()}})
        table = table.replace_schema_metadata({b"huggingface": hf.encode()})
        path = self.root / DATA_PATH.format(episode_chunk=index // CHUNKS_SIZE, episode_index=index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        record = {"episode_index": index, "tasks": [ep.instruction], "length": t, "m2vla_task": ep.task,
                  "seed": ep.seed, "success": ep.success}
        self._append_line("episodes_stats.jsonl", {"episode_index": index, "stats": stats})
        self._append_line("episodes.jsonl", record)  # the commit
        self._episodes += 1
        self._frames += t
        self._committed.append(record)
        self._stats[index] = stats
        self._write_metadata(self._committed, self._stats)
        return index

    def _append_line(self, name: str, record: dict[str, Any]) -> None:
        with open(self.root / "meta" / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def committed_episodes(self) -> list[dict[str, Any]]:
        """The meta/episodes.jsonl records written so far: the episodes a reader will find."""
        return _read_jsonl(self.root / "meta" / "episodes.jsonl")

    def close(self) -> None:
        """Write info.json, tasks.jsonl and stats.json over the committed episodes read back from
        disk (safe to call once at the end, also after an interrupted ``add_episode``)."""
        written = {line["episode_index"]: line["stats"]
                   for line in _read_jsonl(self.root / "meta" / "episodes_stats.jsonl")}
        self._write_metadata(self.committed_episodes(), written)  # the last stats line per index wins

    def _write_metadata(self, committed: list[dict[str, Any]], stats: dict[int, dict[str, Any]]) -> None:
        episodes, frames = len(committed), sum(int(e["length"]) for e in committed)
        pooled: dict[str, list[dict[str, Any]]] = {}
        for e in committed:
            for key, value in stats[e["episode_index"]].items():
                pooled.setdefault(key, []).append(value)
        tasks = "".join(json.dumps({"task_index": i, "task": text}) + "\n"
                        for text, i in sorted(self._tasks.items(), key=lambda kv: kv[1]))
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": episodes, "total_frames": frames, "total_tasks": len(self._tasks),
            "total_videos": 0, "total_chunks": max(1, -(-episodes // CHUNKS_SIZE)), "chunks_size": CHUNKS_SIZE,
            "fps": self.fps, "splits": {"train": f"0:{episodes}"}, "data_path": DATA_PATH,
            "video_path": None, "features": self.features,
        }
        if self.extra_info:
            seeds = {task: [] for task in self.extra_info.get("seeds", {})}
            for e in committed:
                if e["seed"] not in seeds.setdefault(e["m2vla_task"], []):
                    seeds[e["m2vla_task"]].append(e["seed"])
            info["m2vla"] = {**self.extra_info, "seeds": seeds}
        meta = self.root / "meta"
        _replace_text(meta / "tasks.jsonl", tasks)
        _replace_text(meta / "stats.json", json.dumps(_merge_stats(pooled), indent=1) + "\n")
        _replace_text(meta / "info.json", json.dumps(info, indent=4) + "\n")  # last: it names the others' totals

    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _replace_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: a kill mid-write leaves the previous version."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _merge_stats(per_episode: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Pool per-episode mean/std/min/max weighted by count (exact for mean and variance)."""
    out = {}
    for key, items in per_episode.items():
        counts = np.array([s["count"][0] for s in items], dtype=np.float64)
        means = np.array([s["mean"] for s in items], dtype=np.float64)
        stds = np.array([s["std"] for s in items], dtype=np.float64)
        w = (counts / counts.sum()).reshape(-1, *([1] * (means.ndim - 1)))
        mean = (w * means).sum(axis=0)
        var = (w * (stds ** 2 + (means - mean) ** 2)).sum(axis=0)
        out[key] = {"min": np.min([s["min"] for s in items], axis=0).tolist(),
                    "max": np.max([s["max"] for s in items], axis=0).tolist(),
                    "mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": [int(counts.sum())]}
    return out


# ------------------------------------------------------------------------------------ reading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short (no newline after it: a writer killed
    while appending it) is skipped with a warning, so an interrupted commit does not count; any
    other line that is not JSON is an error naming the file and line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # text does not end with a newline: the last append was cut short
                log.warning("%s: skipping its last line, cut short while it was written: %.60r", path, line)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return records


def _require_feature(features: dict[str, Any], key: str, role: str) -> None:
    if key not in features:
        close = difflib.get_close_matches(key, features, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"the dataset has no feature {key!r} for the {role}{hint}; its features: {sorted(features)}. "
                       f"Map the names with FeatureNames({role}=...).")


def _image_column(root: Path, info: dict[str, Any], key: str, cells: list[Any], episode_index: int,
                  dtype: str) -> np.ndarray:
    if dtype == "video":
        return _read_video(root, info, key, episode_index)
    frames = []
    for cell in cells:
        if isinstance(cell, dict):
            data = cell.get("bytes")
            if data is None and cell.get("path"):
                data = (root / cell["path"]).read_bytes()
        else:
            data = cell
        if data is None:
            raise ValueError(f"{key}: a frame of episode {episode_index} has neither bytes nor path")
        frames.append(_decode_image(data))
    return np.stack(frames).astype(np.uint8)  # (T, H, W, 3)


def _read_video(root: Path, info: dict[str, Any], key: str, episode_index: int) -> np.ndarray:
    try:
        import av  # optional: only for datasets that store frames as mp4
    except ImportError as exc:
        raise RuntimeError(f"feature {key!r} is stored as video; reading it needs PyAV (pip install av), "
                           f"or re-export the dataset with image features") from exc
    template = info.get("video_path") or VIDEO_PATH
    chunk = episode_index // int(info.get("chunks_size", CHUNKS_SIZE))
    path = root / template.format(episode_chunk=chunk, video_key=key, episode_index=episode_index)
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.uint8)


def load_lerobot_episodes(root: str | Path, names: FeatureNames | None = None,
                          episode_indices: list[int] | None = None) -> list[Episode]:
    """Read episodes of a LeRobot v2.x dataset directory into ``Episode`` objects (frames uint8)."""
    import pyarrow.parquet as pq

    root = Path(root)
    names = names or FeatureNames()
    info_path = root / "meta" / "info.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{root} is not a LeRobot dataset: {info_path} is missing")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise ValueError(f"{root}: codebase_version {version!r} is not supported (v2.0 / v2.1 only)")
    features = info.get("features", {})
    _require_feature(features, names.image, "image")
    _require_feature(features, names.state, "state")
    _require_feature(features, names.action, "action")
    tasks = {t["task_index"]: t["task"] for t in _read_jsonl(root / "meta" / "tasks.jsonl")}
    meta = {e["episode_index"]: e for e in _read_jsonl(root / "meta" / "episodes.jsonl")}
    indices = sorted(meta) if episode_indices is None else list(episode_indices)
    chunks_size = int(info.get("chunks_size", CHUNKS_SIZE))
    template = info.get("data_path") or DATA_PATH
    fps = float(info.get("fps", 0.0))
    episodes = []
    for index in indices:
        path = root / template.format(episode_chunk=index // chunks_size, episode_index=index)
        if not path.exists():
            raise FileNotFoundError(f"episode {index}: {path} is missing")
        table = pq.read_table(path)
        cols = set(table.column_names)

        def vec(key: str) -> np.ndarray:
            return np.asarray(table.column(key).to_pylist(), dtype=np.float32)  # (T, D)

        frames = _image_column(root, info, names.image,
                               table.column(names.image).to_pylist() if names.image in cols else [],
                               index, features[names.image]["dtype"])
        wrist = None
        if names.wrist_image and names.wrist_image in features:
            wrist = _image_column(root, info, names.wrist_image,
                                  table.column(names.wrist_image).to_pylist() if names.wrist_image in cols else [],
                                  index, features[names.wrist_image]["dtype"])
        ee = vec(names.ee_pose) if names.ee_pose and names.ee_pose in cols else None
        m = meta.get(index, {})
        instruction = ""
        if "task_index" in cols and len(table):
            instruction = tasks.get(int(table.column("task_index")[0].as_py()), "")
        if not instruction and m.get("tasks"):
            instruction = m["tasks"][0]
        timestamps = np.asarray(table.column("timestamp").to_pylist(), dtype=np.float32) if "timestamp" in cols else None
        episodes.append(Episode(instruction=instruction, frames=frames, states=vec(names.state),
                                actions=vec(names.action), fps=fps, task=m.get("m2vla_task", ""), seed=m.get("seed"),
                                success=m.get("success"), index=index, wrist_frames=wrist, ee_poses=ee,
                                timestamps=timestamps))
    return episodes


def load_info(root: str | Path) -> dict[str, Any]:
    return json.loads((Path(root) / "meta" / "info.json").read_text(encoding="utf-8"))
