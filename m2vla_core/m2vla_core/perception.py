"""Perception engine: the frozen backbone + feature cache behind one small object.

The perception ROS node converts messages and calls this; a benchmark or a plain Python
script can call it the same way. Extraction returns the bundle and its compute time; a cache
hit costs a lookup, not a forward pass. For a head that reads the named objects' positions, the
engine also runs that head's object localiser (``use_localiser``, ``read_named_objects``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from m2vla_core.features import FeatureBundle, FeatureContract


@dataclass(frozen=True)
class PerceptionConfig:
    backbone: str = ""  # hub id or local dir; "" = the shipped tiny backbone
    device: str = "cpu"  # cpu | cuda
    cache_bytes: int = 32 << 20  # in-process LRU bound [B]; 0 disables the cache; RSS grows ~1.5x this (soak)
    stop_at_deepest_layer: bool = True
    reuse_instruction: bool = True
    min_image_side_px: int = 8  # smaller frames carry no usable content: refused, not upscaled
    max_aspect_ratio: float = 20.0  # frames more elongated than this are refused (a sensor/driver fault)

    def __post_init__(self) -> None:
        if self.min_image_side_px < 1:
            raise ValueError(f"PerceptionConfig.min_image_side_px must be >= 1, got {self.min_image_side_px}")
        if not self.max_aspect_ratio >= 1.0:
            raise ValueError(f"PerceptionConfig.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"PerceptionConfig.device must be cpu or cuda[:N], got {self.device!r}")
        if self.cache_bytes < 0:
            raise ValueError(f"PerceptionConfig.cache_bytes must be >= 0, got {self.cache_bytes}")


class PerceptionEngine:
    def __init__(self, config: PerceptionConfig) -> None:
        self.config = config
        self.backbone = None
        self.cache = None
        self.hits = 0
        self.misses = 0
        self._default = None  # the backbone at its default input size; self.backbone may be a resized view
        self._unservable: dict[int, str] = {}  # image sizes the backbone refused -> why
        self.reader = None  # NamedObjectReader of the localiser in use, if any
        self.localiser_dir = ""  # the one asked for last (kept when it failed to load: not retried per frame)

    def load(self) -> None:
        from m2vla_core.backbone import FrozenBackbone, default_backbone_path
        from m2vla_core.backbone.cache import FeatureCache

        source = self.config.backbone or str(default_backbone_path())
        self._default = self.backbone = FrozenBackbone.from_pretrained(source, device=self.config.device)
        # keyed by the backbone's feature identity, which includes its input size
        self.cache = FeatureCache(max_bytes=self.config.cache_bytes) if self.config.cache_bytes else None

    def serve(self, contract: FeatureContract) -> bool:
        """Switch the backbone to the input size ``contract`` names; True when it switched.

        A head trained with ``m2vla features --image-size N`` must see N px frames, as in
        training; one whose contract names no size gets the backbone's default. The switch
        shares the loaded weights (``FrozenBackbone.at_image_size``), so it costs no reload.
        """
        if self.backbone is None:
            raise RuntimeError("PerceptionEngine.load() has not run")
        wanted = contract.image_size or self._default.image_size
        if wanted == self.backbone.image_size:
            return False
        if wanted in self._unservable:  # refused once: not retried for every frame
            raise ValueError(self._unservable[wanted])
        try:
            self.backbone = self._default.at_image_size(wanted)
        except Exception as exc:  # noqa: BLE001 - whatever the backbone raises, the node refuses the contract
            self._unservable[wanted] = f"backbone {self.backbone_id} cannot take {wanted} px frames: {exc}"
            raise ValueError(self._unservable[wanted]) from None
        return True

    def use_localiser(self, directory: str) -> bool:
        """Read the named objects with the localiser in ``directory`` ("" = none); True when that
        changed. ValueError when it cannot be used: none is used then, and the same directory is
        not tried again until another was asked for."""
        if self._default is None:
            raise RuntimeError("PerceptionEngine.load() has not run")
        if directory == self.localiser_dir:
            return False
        self.reader, self.localiser_dir = None, directory
        if directory:
            from m2vla_core.heads.localiser import NamedObjectReader, load_localiser

            try:
                localiser = load_localiser(directory, backbone=(self.backbone_id, self.backbone_digest))
                self.reader = NamedObjectReader(localiser, self._default)
            except Exception as exc:  # noqa: BLE001 - CheckpointError, or a backbone that cannot take its input size
                raise ValueError(f"object localiser {directory}: {exc}") from None
        return True

    def read_named_objects(self, rgb: np.ndarray, instruction: str) -> np.ndarray:
        """(4,) the named cube's and target's x, y [m] as the localiser reads them from ``rgb``."""
        if self.reader is None:
            raise RuntimeError("no object localiser in use")
        self.check_image(rgb)
        return self.reader.read(rgb, instruction)

    @property
    def backbone_id(self) -> str:
        return self.backbone.backbone_id if self.backbone is not None else ""

    @property
    def backbone_digest(self) -> str:
        return self.backbone.weights_digest if self.backbone is not None else ""

    def check_contract(self, contract: FeatureContract, expected_digest: str = "") -> None:
        """Raise ValueError when the head's contract cannot be served by this backbone."""
        if self.backbone is None:
            return  # checked again at extraction time
        if contract.deepest_layer > self.backbone.num_layers:
            raise ValueError(f"head reads layer {contract.deepest_layer} but backbone {self.backbone_id} "
                             f"has {self.backbone.num_layers} layers")
        if contract.width != self.backbone.hidden_size:
            raise ValueError(f"head expects width {contract.width}, backbone {self.backbone_id} has "
                             f"{self.backbone.hidden_size}")
        if expected_digest and expected_digest != self.backbone_digest:
            raise ValueError(f"head was trained on backbone digest {expected_digest[:12]}…, this backbone is "
                             f"{self.backbone_digest[:12]}…")

    def check_image(self, rgb: np.ndarray) -> None:
        """Raise ValueError ("bad_image: ...") unless ``rgb`` is a usable (H, W, 3) uint8 frame.

        The backbone resizes any frame to its square input, so a 1x1 or a 1x4000 frame would
        be "valid" yet meaningless; it is refused here, at the boundary, and counted.
        """
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"bad_image: expected an (H, W, 3) uint8 array, got "
                             f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', type(rgb).__name__)}")
        h, w = int(rgb.shape[0]), int(rgb.shape[1])
        if min(h, w) < self.config.min_image_side_px:
            raise ValueError(f"bad_image: {w}x{h} frame is smaller than {self.config.min_image_side_px} px on a side")
        if max(h, w) > self.config.max_aspect_ratio * min(h, w):
            raise ValueError(f"bad_image: {w}x{h} frame is more elongated than {self.config.max_aspect_ratio:g}:1")

    def extract(self, rgb: np.ndarray, instruction: str, contract: FeatureContract) -> tuple[FeatureBundle, float]:
        """(bundle, compute_ms); compute_ms is 0.0 on a cache hit."""
        if self.backbone is None:
            raise RuntimeError("PerceptionEngine.load() has not run")
        self.check_image(rgb)
        self.check_contract(contract)
        key = None
        if self.cache is not None:
            key = self.cache.key(hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest(), instruction,
                                 self.backbone.feature_identity, contract)
            hit = self.cache.get(key)
            if hit is not None:
                self.hits += 1
                return hit, 0.0
        self.misses += 1
        t0 = time.perf_counter()
        bundle = self.backbone.extract(rgb, instruction, contract,
                                       stop_at_deepest=self.config.stop_at_deepest_layer,
                                       reuse_instruction=self.config.reuse_instruction)
        compute_ms = (time.perf_counter() - t0) * 1e3
        if key is not None:
            self.cache.put(key, bundle)
        return bundle, compute_ms

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses}
