"""Run a head: the policy-level API and its two-method backends.

``HeadPolicy.infer(features (L, T, D), mask (T,), state (S,)) -> chunk (H, A)`` checks the
inputs against the head's contract and delegates to a runtime; ``reset()`` clears per-episode
state (none today: prediction is pure, the controller owns execution). Runtimes:
``TorchHeadRuntime`` (eager PyTorch, CPU or CUDA) and ``OnnxHeadRuntime`` (onnxruntime, CPU
or CUDA provider) swap freely behind the same two methods.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from m2vla_core.config_io import from_dict
from m2vla_core.heads.checkpoint import CheckpointError, check_backbone, load_head, load_head_config
from m2vla_core.heads.configuration_head import HeadConfig
from m2vla_core.heads.policy_head import ContractError, PolicyHead
from m2vla_core.export.onnx_export import CONFIG_METADATA_KEY, DEFAULT_ONNX_NAME, OUTPUT_NAME

BACKENDS = ("torch", "onnxruntime")


class HeadRuntime(Protocol):
    config: HeadConfig

    def infer(self, features: np.ndarray, mask: np.ndarray, state: np.ndarray) -> np.ndarray: ...  # batched -> (B, H, A)

    def reset(self) -> None: ...


class TorchHeadRuntime:
    """Eager PyTorch execution of a loaded head (batched numpy in, numpy out)."""

    def __init__(self, head: PolicyHead, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.head = head.to(self.device).eval()
        self.config = head.config

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str = "cpu", backbone: tuple[str, str] | None = None) -> "TorchHeadRuntime":
        return cls(load_head(checkpoint, backbone=backbone), device)

    @torch.inference_mode()
    def infer(self, features: np.ndarray, mask: np.ndarray, state: np.ndarray) -> np.ndarray:
        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).to(self.device)
        s = torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)).to(self.device)
        return self.head(f, m, s).float().cpu().numpy()

    def reset(self) -> None:
        pass


class OnnxHeadRuntime:
    """onnxruntime execution of an exported head; the contract comes from the model metadata."""

    def __init__(self, onnx_path: str | os.PathLike, device: str = "cpu", *, threads: int = 1,
                 backbone: tuple[str, str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if path.is_dir():
            path = path / DEFAULT_ONNX_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: no ONNX model (run `m2vla export CKPT` first)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(f"device {device!r}: onnxruntime has no CUDAExecutionProvider "
                                   f"(available: {ort.get_available_providers()}); install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, InvalidArgument, Fail)
            detail = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {detail}); "
                                  f"re-run `m2vla export`") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_METADATA_KEY not in meta:
            raise CheckpointError(f"{path}: ONNX model lacks {CONFIG_METADATA_KEY!r} metadata; export it with `m2vla export`")
        try:
            self.config = from_dict(HeadConfig, json.loads(meta[CONFIG_METADATA_KEY]))
        except ValueError as exc:  # json.JSONDecodeError and ConfigError are ValueErrors
            raise CheckpointError(f"{path}: damaged {CONFIG_METADATA_KEY!r} metadata ({exc})") from exc
        if backbone is not None:
            check_backbone(self.config, *backbone)
        self.path = path

    def infer(self, features: np.ndarray, mask: np.ndarray, state: np.ndarray) -> np.ndarray:
        feeds = {"features": np.ascontiguousarray(features, dtype=np.float32),
                 "mask": np.ascontiguousarray(mask, dtype=bool), "state": np.ascontiguousarray(state, dtype=np.float32)}
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def reset(self) -> None:
        pass


def checked_inputs(config: HeadConfig, features, mask, state, *, expects: str = "head expects"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """features (n_layers, T, D) float32, mask (T,), state (S,) float32 as ``config`` declares them,
    else ContractError: a wrong shape or a NaN never reaches a runtime."""
    features = np.asarray(features, dtype=np.float32)
    mask = np.asarray(mask)
    state = np.asarray(state, dtype=np.float32)
    if features.shape != config.contract.shape:
        raise ContractError(f"features shaped {features.shape}, {expects} (n_layers, T, D) = {config.contract.shape} "
                            f"for layers {config.contract.layers}")
    if mask.shape != (config.contract.num_tokens,):
        raise ContractError(f"mask shaped {mask.shape}, {expects} ({config.contract.num_tokens},)")
    if state.shape != (config.state_dim,):
        raise ContractError(f"state shaped {state.shape}, {expects} ({config.state_dim},)")
    if not (np.isfinite(features).all() and np.isfinite(state).all()):
        raise ContractError("features or state contain NaN / inf")
    return features, mask, state


class HeadPolicy:
    """One observation -> one chunk, with the contract checked at the boundary."""

    def __init__(self, runtime: HeadRuntime) -> None:
        self.runtime = runtime
        self.config: HeadConfig = runtime.config

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu", *,
             backbone: tuple[str, str] | None = None, threads: int = 1) -> "HeadPolicy":
        """``checkpoint`` dir (its model.onnx for onnxruntime) or an .onnx file for onnxruntime."""
        if backend == "torch":
            return cls(TorchHeadRuntime.load(checkpoint, device, backbone))
        if backend == "onnxruntime":
            runtime = OnnxHeadRuntime(checkpoint, device, threads=threads, backbone=backbone)
            ckpt = Path(checkpoint)
            if ckpt.is_dir() and (ckpt / "config.json").is_file() and load_head_config(ckpt) != runtime.config:
                raise CheckpointError(f"{ckpt}: model.onnx was exported from another config.json; re-run `m2vla export`")
            return cls(runtime)
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return (self.config.chunk_len, self.config.action_dim)

    def infer(self, features: np.ndarray, mask: np.ndarray, state: np.ndarray) -> np.ndarray:
        """features (n_layers, T, D), mask (T,), state (S,) -> chunk (H, A) float32."""
        features, mask, state = checked_inputs(self.config, features, mask, state)
        chunk = self.runtime.infer(features[None], mask.astype(bool)[None], state[None])[0]  # (H, A)
        if chunk.shape != self.chunk_shape:
            raise ContractError(f"runtime returned {chunk.shape}, expected {self.chunk_shape}")
        return chunk

    def infer_bundle(self, bundle, state: np.ndarray) -> np.ndarray:
        """Same as ``infer`` for a ``FeatureBundle``; its contract must equal the head's."""
        if bundle.contract != self.config.contract:
            raise ContractError(f"features were computed for {bundle.contract}, head reads {self.config.contract}")
        hidden, mask = bundle.numpy()
        return self.infer(hidden, mask, state)

    def reset(self) -> None:
        self.runtime.reset()
