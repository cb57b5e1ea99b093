"""Frozen VLM backbone side of m2vla: tiny offline backbones, the adapter, the feature cache.

Imports are lazy so ``import m2vla_core.backbone`` stays cheap (no torch / transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from m2vla_core.backbone.tiny import default_backbone_digest, default_backbone_path, make_tiny_vlm, weights_digest

if TYPE_CHECKING:
    from m2vla_core.backbone.adapter import FrozenBackbone
    from m2vla_core.backbone.cache import DiskFeatureCache, FeatureCache

__all__ = ["FrozenBackbone", "FeatureCache", "DiskFeatureCache", "default_backbone_path", "default_backbone_digest",
           "make_tiny_vlm", "weights_digest"]


def __getattr__(name: str):
    if name == "FrozenBackbone":
        from m2vla_core.backbone.adapter import FrozenBackbone

        return FrozenBackbone
    if name in ("FeatureCache", "DiskFeatureCache"):
        from m2vla_core.backbone import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'm2vla_core.backbone' has no attribute {name!r}")
