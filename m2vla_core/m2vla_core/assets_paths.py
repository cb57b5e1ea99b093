"""Where the package's shipped assets live, so callers never hard-code install paths."""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent / "assets"


def default_backbone_path() -> Path:
    """Directory of the shipped tiny random-weight Qwen2-VL backbone."""
    return _ASSETS / "tiny_qwen2vl"


def default_policy_path() -> Path:
    """Directory of the shipped MoL+MSM head checkpoint (config.json, model.safetensors, model.onnx).

    Trained on the tiny backbone above; ``scripts/make_default_policy.sh`` reproduces it.
    """
    return _ASSETS / "policies" / "default"
