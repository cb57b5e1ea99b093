"""Feature caches: an in-process LRU bounded in bytes, and an on-disk safetensors store.

Perception recomputes nothing it has seen: a frame + instruction + backbone + contract maps
to one key. The disk cache lets a dataset's features be computed once and read by every
training run. It stores safetensors shards and a JSON index only, so reading a cache never
executes code; a damaged shard is reported and treated as a miss, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from m2vla_core.features import FeatureBundle, FeatureContract

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def feature_key(image_digest: str, instruction: str, backbone_identity: str, contract: FeatureContract) -> str:
    """Stable text key of one observation's features (sha256 hex).

    ``backbone_identity`` should be ``FrozenBackbone.feature_identity`` (weights + prompt
    layout + input size + compute dtype); the weights digest alone also works.
    """
    parts = {"image": image_digest, "instruction": instruction, "backbone": backbone_identity,
             "layers": list(contract.layers), "n_img": contract.num_image_tokens, "n_txt": contract.num_text_tokens,
             "width": contract.width, "dtype": contract.dtype}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def bundle_nbytes(bundle: FeatureBundle) -> int:
    return bundle.hidden.numel() * bundle.hidden.element_size() + bundle.mask.numel() * bundle.mask.element_size()


class FeatureCache:
    """Thread-safe LRU of FeatureBundles, bounded by ``max_bytes`` of tensor memory.

    Hits return the stored bundle itself (no copy, well under 1 ms): treat its tensors as
    read-only. A bundle larger than the whole bound is not stored.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"FeatureCache.max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[FeatureBundle, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(image_digest: str, instruction: str, backbone_identity: str, contract: FeatureContract) -> str:
        return feature_key(image_digest, instruction, backbone_identity, contract)

    def get(self, key: str) -> FeatureBundle | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, bundle: FeatureBundle) -> bool:
        """Store ``bundle``; returns False when it alone exceeds the bound."""
        size = bundle_nbytes(bundle)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return False
            self._entries[key] = (bundle, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self),
                "bytes": self._bytes, "max_bytes": self.max_bytes}


class CorruptCacheError(ValueError):
    """A disk-cache shard or index is damaged or not what the index says."""


@dataclass(frozen=True)
class _Row:
    shard: str
    row: int


class DiskFeatureCache:
    """Features on disk: safetensors shards (stacked rows of one contract) + ``index.json``.

    Writes are atomic (temp file + rename; the index is replaced after its shard exists), so
    an interrupted run leaves a consistent cache. One writer process at a time; any number
    of readers. Each shard's sha256 is checked the first time a process reads it. With
    ``strict=False`` (default) a damaged shard is logged, dropped from the index and read as
    a miss so the caller recomputes; ``strict=True`` raises CorruptCacheError.
    """

    def __init__(self, root: str | os.PathLike, *, strict: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.strict = strict
        self._lock = threading.Lock()
        self._verified: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self._rows: dict[str, _Row] = {}
        self._shards: dict[str, dict] = {}
        self._load_index()

    # ------------------------------------------------------------------ index
    def _load_index(self) -> None:
        path = self.root / INDEX_NAME
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != INDEX_VERSION:
                raise CorruptCacheError(f"{path}: index version {data.get('version')!r}, expected {INDEX_VERSION}")
            shards = {str(k): dict(v) for k, v in data["shards"].items()}
            rows = {str(k): _Row(str(v[0]), int(v[1])) for k, v in data["entries"].items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if self.strict:
                raise CorruptCacheError(f"{path}: unreadable feature-cache index ({exc})") from exc
            log.warning("feature cache %s: unreadable index (%s); starting empty", self.root, exc)
            self.corrupt += 1
            return
        self._shards, self._rows = shards, rows

    def _write_index(self) -> None:
        data = {"version": INDEX_VERSION, "shards": self._shards,
                "entries": {k: [r.shard, r.row] for k, r in self._rows.items()}}
        _atomic_write_bytes(self.root / INDEX_NAME, (json.dumps(data, sort_keys=True) + "\n").encode())

    # ------------------------------------------------------------------ write
    def put(self, key: str, bundle: FeatureBundle) -> None:
        self.put_many([(key, bundle)])

    def put_many(self, items: Sequence[tuple[str, FeatureBundle]]) -> str | None:
        """Write bundles sharing one contract as one shard; returns the shard file name."""
        from safetensors.torch import save

        items = [(k, b) for k, b in items if k not in self._rows]
        if not items:
            return None
        contract = items[0][1].contract
        if any(b.contract != contract for _, b in items):
            raise ValueError("put_many: all bundles of one shard must share a FeatureContract")
        hidden = torch.stack([b.hidden.detach().cpu() for _, b in items]).contiguous()  # (N, nL, T, D)
        mask = torch.stack([b.mask.detach().cpu() for _, b in items]).contiguous()  # (N, T)
        meta = {"contract": json.dumps({"layers": list(contract.layers), "num_image_tokens": contract.num_image_tokens,
                                        "num_text_tokens": contract.num_text_tokens, "width": contract.width,
                                        "dtype": contract.dtype, "image_size": contract.image_size}),
                "keys": json.dumps([k for k, _ in items]),
                "backbone_ids": json.dumps([b.backbone_id for _, b in items]),
                "instructions": json.dumps([b.instruction for _, b in items]),
                "image_digests": json.dumps([b.image_digest for _, b in items])}
        payload = save({"hidden": hidden, "mask": mask}, metadata=meta)
        digest = hashlib.sha256(payload).hexdigest()
        name = f"shard-{digest[:24]}.safetensors"
        with self._lock:
            _atomic_write_bytes(self.root / name, payload)
            self._shards[name] = {"sha256": digest, "rows": len(items), "bytes": len(payload)}
            for row, (key, _) in enumerate(items):
                self._rows[key] = _Row(name, row)
            self._write_index()
            self._verified.add(name)
        return name

    # ------------------------------------------------------------------ read
    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> FeatureBundle | None:
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        try:
            bundle = self._read(key, row)
        except CorruptCacheError as exc:
            self.corrupt += 1
            if self.strict:
                raise
            log.warning("feature cache %s: %s; dropping the shard, features will be recomputed", self.root, exc)
            self._drop_shard(row.shard)
            self.misses += 1
            return None
        self.hits += 1
        return bundle

    def _read(self, key: str, row: _Row) -> FeatureBundle:
        from safetensors import safe_open

        path = self.root / row.shard
        info = self._shards.get(row.shard, {})
        if not path.is_file():
            raise CorruptCacheError(f"shard {row.shard} is missing")
        if row.shard not in self._verified:
            if path.stat().st_size != info.get("bytes"):
                raise CorruptCacheError(f"shard {row.shard} has {path.stat().st_size} bytes, index says {info.get('bytes')}")
            if _sha256_file(path) != info.get("sha256"):
                raise CorruptCacheError(f"shard {row.shard} content does not match its sha256")
            self._verified.add(row.shard)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = json.loads(meta["keys"])
                if keys[row.row] != key:
                    raise CorruptCacheError(f"shard {row.shard} row {row.row} holds another key")
                c = json.loads(meta["contract"])
                contract = FeatureContract(layers=tuple(c["layers"]), num_image_tokens=c["num_image_tokens"],
                                           num_text_tokens=c["num_text_tokens"], width=c["width"], dtype=c["dtype"],
                                           image_size=int(c.get("image_size", 0)))
                hidden = f.get_slice("hidden")[row.row]  # (nL, T, D)
                mask = f.get_slice("mask")[row.row]  # (T,)
                return FeatureBundle(hidden=hidden, mask=mask.bool(), contract=contract,
                                     backbone_id=json.loads(meta["backbone_ids"])[row.row],
                                     instruction=json.loads(meta["instructions"])[row.row],
                                     image_digest=json.loads(meta["image_digests"])[row.row])
        except CorruptCacheError:
            raise
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise CorruptCacheError(f"shard {row.shard} is unreadable ({type(exc).__name__}: {exc})") from exc

    def _drop_shard(self, shard: str) -> None:
        with self._lock:
            self._rows = {k: r for k, r in self._rows.items() if r.shard != shard}
            self._shards.pop(shard, None)
            self._verified.discard(shard)
            self._write_index()

    def verify(self) -> list[str]:
        """Check every shard against the index; return the names of damaged ones (not dropped)."""
        bad = []
        for name, info in sorted(self._shards.items()):
            path = self.root / name
            if not path.is_file() or path.stat().st_size != info.get("bytes") or _sha256_file(path) != info.get("sha256"):
                bad.append(name)
        return bad

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt, "entries": len(self._rows),
                "shards": len(self._shards)}


def precompute_features(backbone, items: Iterable[tuple[np.ndarray, str]], contract: FeatureContract,
                        disk: DiskFeatureCache, *, batch_size: int = 16, shard_rows: int = 256) -> dict[str, int]:
    """Compute features of (image, instruction) items not yet on disk, written in shards.

    Returns counts {"computed": n, "cached": m}. ``backbone`` is a FrozenBackbone.
    """
    from m2vla_core.backbone.adapter import image_digest, validate_image
    from m2vla_core.instructions import clean_instruction

    pending: list[tuple[str, np.ndarray, str]] = []
    pending_keys: set[str] = set()
    computed = cached = 0

    def flush() -> None:
        nonlocal computed
        if not pending:
            return
        bundles = backbone.extract_batch([im for _, im, _ in pending], [t for _, _, t in pending], contract,
                                         batch_size=batch_size)
        disk.put_many([(k, b) for (k, _, _), b in zip(pending, bundles)])
        computed += len(pending)
        pending.clear()
        pending_keys.clear()

    for image, instruction in items:
        image = validate_image(image)
        text = clean_instruction(instruction)
        key = feature_key(image_digest(image), text, backbone.feature_identity, contract)
        if key in disk or key in pending_keys:
            cached += 1
            continue
        pending.append((key, image, text))
        pending_keys.add(key)
        if len(pending) >= shard_rows:
            flush()
    flush()
    return {"computed": computed, "cached": cached}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
