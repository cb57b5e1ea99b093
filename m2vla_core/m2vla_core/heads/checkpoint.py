"""Head checkpoints: a directory with ``config.json`` + ``model.safetensors``.

Weights, normalisation statistics and the MSM skill memory all live in model.safetensors.
Loading never unpickles anything: it reads the JSON config strictly (unknown keys refused),
checks every weights file by its magic bytes and its safetensors header (pickle / zip torch
files and truncated files are refused before any tensor is read), then checks keys and shapes
against the model the config describes.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from m2vla_core.config_io import ConfigError, load_json, save_json
from m2vla_core.heads.configuration_head import HeadConfig
from m2vla_core.heads.policy_head import NORM_KEYS, RANGE_KEYS, PolicyHead

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar")
HEADER_LIMIT = 100 << 20  # a safetensors JSON header larger than this is not one of ours


class CheckpointError(ValueError):
    """A head checkpoint is missing, unsafe, damaged or does not fit this code / backbone."""


def sniff_weights_format(path: Path) -> str:
    """"safetensors" | "pickle" | "torch-zip" | "numpy" | "unknown" from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its little-endian header length can start with the bytes of a pickle's
    # protocol marker (a 896-byte header is 80 03 ...), and calling it safetensors unpickles nothing
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < HEADER_LIMIT and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    return "unknown"


def check_safetensors_file(path: Path) -> dict:
    """Validate format and completeness of a safetensors file without reading tensors; -> header."""
    kind = sniff_weights_format(path)
    if kind != "safetensors":
        hint = " (a pickled torch/pickle file: refused, never unpickled; re-save it as safetensors)" \
            if kind in ("pickle", "torch-zip") else ""
        raise CheckpointError(f"{path}: not a safetensors file, looks like {kind}{hint}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged safetensors header ({exc})") from exc
    ends = [end for _, end in _header_offsets(path, header)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise CheckpointError(f"{path}: truncated or padded safetensors file ({size} bytes, header describes {expected})")
    return header


def _header_offsets(path: Path, header: object) -> list[tuple[int, int]]:
    """The (begin, end) byte range of every tensor a safetensors header describes; CheckpointError
    unless it is a dict of {dtype: str, shape: [int], data_offsets: [int, int]} entries (plus an
    optional ``__metadata__`` dict)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (a JSON {type(header).__name__}, not an object)")
    offsets = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise CheckpointError(f"{path}: damaged safetensors header (__metadata__ is not an object)")
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{path}: damaged safetensors header (entry {key!r} needs dtype, shape and "
                                  f"data_offsets, got {entry!r:.80})")
        span, shape = entry["data_offsets"], entry["shape"]
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(x) and x >= 0 for x in span)
                and span[0] <= span[1]):
            raise CheckpointError(f"{path}: damaged safetensors header (entry {key!r}: data_offsets {span!r:.80})")
        if not (isinstance(entry["dtype"], str) and isinstance(shape, list)
                and all(_is_int(x) and x >= 0 for x in shape)):
            raise CheckpointError(f"{path}: damaged safetensors header (entry {key!r}: dtype {entry['dtype']!r:.40}, "
                                  f"shape {shape!r:.80})")
        offsets.append((span[0], span[1]))
    return offsets


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def refuse_pickles(directory: Path) -> None:
    for p in sorted(directory.iterdir()):
        if p.is_file() and (p.suffix.lower() in PICKLE_SUFFIXES or
                            (p.suffix.lower() not in (".json", ".onnx", ".png", ".md", ".txt", ".csv")
                             and sniff_weights_format(p) in ("pickle", "torch-zip"))):
            raise CheckpointError(f"{p}: pickle-format weights are refused (never unpickled); "
                                  f"checkpoints hold JSON configs and safetensors weights only")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared read-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_weights(directory: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, tensors) of ``directory / name``: present, really safetensors (checked before any
    tensor is read) and readable, else CheckpointError."""
    weights = Path(directory) / name
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {name}")
    check_safetensors_file(weights)
    try:
        return weights, load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable safetensors ({exc})") from exc


def check_state_matches(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights: Path,
                        config_name: str) -> None:
    """Refuse tensors whose names or shapes differ from those the config's model has."""
    if set(state) != set(expected):
        raise CheckpointError(f"{weights}: tensors do not match {config_name} "
                              f"(missing {sorted(set(expected) - set(state))[:8]}, "
                              f"unexpected {sorted(set(state) - set(expected))[:8]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{weights}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"{config_name} implies {tuple(expected[key].shape)}")


def save_head(head: PolicyHead, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors (atomically) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not bool(head.normalizer.fitted):
        raise CheckpointError("refusing to save a head without normalisation statistics (call normalizer.set_stats)")
    if head.uses_memory and head.action_head.memory.size == 0:
        raise CheckpointError("refusing to save an MSM head with an empty skill memory (call build_memory)")
    atomic_save_safetensors(head.state_dict(), directory / WEIGHTS_NAME, {"format": "m2vla-head", "version": "1"})
    save_json(head.config, directory / CONFIG_NAME)
    return directory


def load_config_file(cls: type[T], path: str | os.PathLike, missing: str) -> T:
    """Strict JSON config of a checkpoint part; a missing or invalid file is a CheckpointError
    (``missing`` is the message for the first case, e.g. what the directory should have been)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return load_json(cls, path)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_head_config(directory: str | os.PathLike) -> HeadConfig:
    return load_config_file(HeadConfig, Path(directory) / CONFIG_NAME,
                            f"{directory}: no {CONFIG_NAME}; not a head checkpoint directory")


def check_backbone(config: HeadConfig, backbone_id: str, weights_digest: str) -> None:
    """Refuse a head trained on another backbone (id or weights digest differ)."""
    if config.backbone_id != backbone_id or config.backbone_digest != weights_digest:
        raise CheckpointError(f"head was trained on backbone {config.backbone_id!r} (weights {config.backbone_digest[:12] or '?'}), "
                              f"refusing to run it on {backbone_id!r} (weights {weights_digest[:12] or '?'})")


def load_head(directory: str | os.PathLike, *, backbone: tuple[str, str] | None = None,
              device: str | torch.device = "cpu") -> PolicyHead:
    """Load a checkpoint safely; ``backbone=(id, weights_digest)`` also checks the backbone identity."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: head checkpoint directory not found")
    refuse_pickles(directory)
    config = load_head_config(directory)
    if backbone is not None:
        check_backbone(config, *backbone)
    weights, state = read_weights(directory, WEIGHTS_NAME)
    head = PolicyHead(config)
    missing_norm = [k for k in NORM_KEYS if k not in state]
    if missing_norm:
        raise CheckpointError(f"{weights}: missing normalisation stats {missing_norm}; retrain or re-save with statistics")
    if float(state["normalizer.fitted"]) != 1.0:
        raise CheckpointError(f"{weights}: normalisation stats were never fitted")
    expected = head.state_dict()
    if not any(k in state for k in RANGE_KEYS):
        log.warning("%s: saved before heads kept their output in the demonstrated action range; running it "
                    "unbounded (retrain to get the range)", weights)
        state = {**state, **{k: expected[k] for k in RANGE_KEYS}}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match config.json (missing {missing[:8]}, unexpected {unexpected[:8]})")
    memory_prefix = "action_head.memory."
    for key, tensor in state.items():
        want = tuple(expected[key].shape)
        got = tuple(tensor.shape)
        if key.startswith(memory_prefix):  # memory entry count is data-dependent, bounded by capacity
            ok = got[1:] == want[1:] and got[0] <= config.arch.msm.memory_size
        else:
            ok = got == want
        if not ok:
            raise CheckpointError(f"{weights}: tensor {key!r} has shape {got}, config.json implies {want}")
    head.load_state_dict(state)
    if head.uses_memory and head.action_head.memory.size < config.arch.msm.top_k:
        raise CheckpointError(f"{weights}: skill memory has {head.action_head.memory.size} entries < top_k={config.arch.msm.top_k}")
    return head.to(device).eval()
