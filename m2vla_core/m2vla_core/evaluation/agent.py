"""``VLAAgent``: the in-process policy the evaluation rolls out.

It runs exactly what the ROS graph runs, minus the transport: the camera frame and the
instruction go through the frozen backbone under the head's feature contract (perception
node), then ``HeadPolicy.infer(hidden, mask, joint state)`` gives the chunk (policy node).
So a success rate measured here is the success rate of the shipped nodes' model path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


class VLAAgent:
    """Frozen backbone + trained head behind the rollout ``Agent`` protocol (``reset`` / ``act``)."""

    def __init__(self, backbone, policy) -> None:
        from m2vla_core.heads.checkpoint import check_backbone

        check_backbone(policy.config, backbone.backbone_id, backbone.weights_digest)
        backbone.check_contract(policy.config.contract)
        self.backbone = backbone
        self.policy = policy
        self.contract = policy.config.contract
        self.backbone_ms: list[float] = []  # per act(): feature extraction time
        self.head_ms: list[float] = []  # per act(): head inference time

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, *, backend: str = "onnxruntime", device: str = "cpu",
             backbone_path: str | os.PathLike | None = None, backbone=None) -> "VLAAgent":
        """Load a head checkpoint (default: the shipped policy) and the backbone it was trained on."""
        from m2vla_core.assets_paths import default_policy_path
        from m2vla_core.backbone.adapter import FrozenBackbone
        from m2vla_core.backbone.tiny import default_backbone_path
        from m2vla_core.export.runtime import HeadPolicy

        if backbone is None:
            backbone = FrozenBackbone.from_pretrained(backbone_path or default_backbone_path(), device=device)
        ckpt = Path(checkpoint) if checkpoint else default_policy_path()
        if (ckpt / "packs.json").is_file():  # a routed set of skill packs (m2vla pack combine)
            from m2vla_core.packs import PackedPolicy

            policy = PackedPolicy.load(ckpt, backend=backend, device=device)
        else:
            policy = HeadPolicy.load(ckpt, backend=backend, device=device,
                                     backbone=(backbone.backbone_id, backbone.weights_digest))
        return cls(backbone, policy)

    @property
    def chunk_len(self) -> int:
        return int(self.policy.config.chunk_len)

    def reset(self) -> None:
        self.policy.reset()

    def act(self, observation) -> np.ndarray:
        """Observation (image, instruction, joint_positions) -> chunk (H, A) of joint-position targets."""
        if observation.image is None:
            raise ValueError("VLAAgent needs camera images: SimConfig.render must be True")
        t0 = time.perf_counter()
        bundle = self.backbone.extract(observation.image, observation.instruction, self.contract)
        hidden, mask = bundle.numpy()  # (n_layers, T, D), (T,)
        t1 = time.perf_counter()
        chunk = self.policy.infer(hidden, mask, np.asarray(observation.joint_positions, dtype=np.float32))  # (H, A)
        t2 = time.perf_counter()
        self.backbone_ms.append((t1 - t0) * 1e3)
        self.head_ms.append((t2 - t1) * 1e3)
        return chunk
