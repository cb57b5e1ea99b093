"""Heads to time: the shipped policy when it exists, otherwise random heads of the same shape.

Latency does not depend on the weights, so a seeded random head with the tiny backbone's
contract times the same graph a trained one runs. ``random_policy_dir`` also writes such a
head as a loadable checkpoint (config.json + model.safetensors + model.onnx) for the ROS path.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from m2vla_core.features import FeatureContract
from m2vla_core.heads.configuration_head import HeadConfig
from m2vla_core.heads.factory import DEFAULT_PRESET, get_preset
from m2vla_core.heads.policy_head import PolicyHead

TINY_CONTRACT = FeatureContract(layers=(2, 4, 6), num_image_tokens=16, num_text_tokens=16, width=128)  # tiny_head's
HOME_POSE = (0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785, 0.04)  # sim HOME_ARM_Q [rad] + gripper opening [m]
ACTION_STD = 0.03  # [rad | m] random chunks stay near the home pose, inside every controller limit


def make_head(contract: FeatureContract = TINY_CONTRACT, *, chunk_len: int = 16, action_dim: int = 8,
              state_dim: int = 8, top_k: int = 4, preset: str = DEFAULT_PRESET, memory_entries: int = 2048,
              backbone_id: str = "tiny-qwen2vl", backbone_digest: str = "0" * 64, seed: int = 0) -> PolicyHead:
    """A random-weight head (full skill memory, fitted stats) of the given sizes, in eval mode."""
    torch.manual_seed(seed)
    arch = get_preset(preset)
    arch = replace(arch, msm=replace(arch.msm, top_k=top_k, num_basis=min(arch.msm.num_basis, chunk_len)),
                   skills=replace(arch.skills, num_basis=min(arch.skills.num_basis, chunk_len)))
    config = HeadConfig(contract=contract, state_dim=state_dim, action_space="joint", action_dim=action_dim,
                        chunk_len=chunk_len, dt_s=0.1, backbone_id=backbone_id, backbone_digest=backbone_digest,
                        arch=arch)
    head = PolicyHead(config).eval()
    pose = np.resize(np.asarray(HOME_POSE), action_dim)
    head.normalizer.set_stats(np.resize(np.asarray(HOME_POSE), state_dim), np.ones(state_dim), pose,
                              np.full(action_dim, ACTION_STD))
    if head.uses_memory:
        m = min(memory_entries, config.arch.msm.memory_size)
        keys = torch.randn(m, contract.width + state_dim)  # (M, D + S)
        values = torch.randn(m, chunk_len, action_dim)  # (M, H, A), normalised chunks
        head.action_head.memory.set(keys, values, torch.arange(m))
    return head


def shipped_policy_dir() -> Path | None:
    """The trained shipped checkpoint when this install has one (config.json + model.safetensors)."""
    from m2vla_core.assets_paths import default_policy_path

    path = Path(default_policy_path())
    return path if (path / "config.json").is_file() and (path / "model.safetensors").is_file() else None


def policy_head() -> tuple[PolicyHead, str]:
    """(head, description): the shipped policy if present, else a random head of the tiny contract."""
    path = shipped_policy_dir()
    if path is not None:
        from m2vla_core.heads.checkpoint import load_head

        return load_head(path), f"shipped policy {path}"
    return make_head(), "random-weight MoL+MSM head (tiny contract; no shipped policy in this install)"


class OrtHead:
    """A head exported to a temporary ONNX file and run by onnxruntime (plus its torch twin)."""

    def __init__(self, head: PolicyHead, threads: int = 1, device: str = "cpu") -> None:
        from m2vla_core.export.onnx_export import example_inputs, export_onnx
        from m2vla_core.export.runtime import OnnxHeadRuntime, TorchHeadRuntime

        self.head = head.cpu().eval()
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(self.head, Path(tmp) / "head.onnx")
            self.max_abs_error = float(exported.max_abs_error) if exported.max_abs_error is not None else float("nan")
            self.ort = OnnxHeadRuntime(exported.path, device, threads=threads)  # session holds the model in memory
        self.torch = TorchHeadRuntime(self.head)
        self.inputs = tuple(t.numpy() for t in example_inputs(self.head, 1))  # features, mask, state (batch 1)

    def step_ort(self, *_: object) -> np.ndarray:
        return self.ort.infer(*self.inputs)

    def step_torch(self, *_: object) -> np.ndarray:
        return self.torch.infer(*self.inputs)


def random_policy_dir(out_dir: Path, backbone_id: str, backbone_digest: str) -> Path:
    """Write a random MoL+MSM checkpoint for the tiny backbone (ROS path without a shipped policy)."""
    from m2vla_core.export.onnx_export import export_onnx
    from m2vla_core.heads.checkpoint import save_head

    out_dir = Path(out_dir)
    head = make_head(backbone_id=backbone_id, backbone_digest=backbone_digest)
    save_head(head, out_dir)
    export_onnx(head, out_dir / "model.onnx")
    return out_dir
