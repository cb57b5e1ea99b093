"""How long each section measures: the full run vs ``--quick`` (harness check, a few seconds each)."""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("head", "backbone", "vs_text_actions", "ros", "scaling", "gpu")
SECTION_ALIASES = {"ros_path": "ros", "controller": "ros", "text": "vs_text_actions", "text_actions": "vs_text_actions"}
INSTRUCTION = "pick up the red cube and place it on the blue tray"


@dataclass(frozen=True)
class BenchSettings:
    head_iters: int = 3000  # head steps per runtime (interleaved torch / onnxruntime)
    head_warmup: int = 200
    backbone_frames: int = 60  # distinct frames per optimisation variant (interleaved)
    backbone_warmup: int = 3
    cache_hit_iters: int = 500
    text_iters: int = 12  # generate() calls at the policy's (H, A)
    text_scaling_iters: int = 4  # generate() calls per (H, A) scaling point
    text_scaling_points: tuple[tuple[int, int], ...] = ((8, 8), (16, 8), (32, 8), (16, 14))  # (H, A)
    scaling_iters: int = 1000  # onnxruntime head steps per scaling point
    scaling_layers: tuple[int, ...] = (1, 2, 3, 4, 6)
    scaling_image_tokens: tuple[int, ...] = (4, 16, 64)
    scaling_top_k: tuple[int, ...] = (1, 4, 8, 16)
    scaling_chunk_len: tuple[int, ...] = (8, 16, 32, 64)
    ros_trials: int = 20  # instructions published, one after the other
    controller_duration_s: float = 30.0  # [s] per command rate
    threads: int = 1  # torch / onnxruntime intra-op threads

    def __post_init__(self) -> None:
        for name in ("head_iters", "backbone_frames", "cache_hit_iters", "text_iters", "text_scaling_iters",
                     "scaling_iters", "ros_trials", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_warmup", "backbone_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"BenchSettings.{name} must be >= 0, got {getattr(self, name)}")
        if not self.controller_duration_s > 0:
            raise ValueError(f"BenchSettings.controller_duration_s must be > 0, got {self.controller_duration_s}")
        if not self.text_scaling_points:
            raise ValueError("BenchSettings.text_scaling_points must not be empty")


FULL = BenchSettings()
QUICK = BenchSettings(head_iters=100, head_warmup=10, backbone_frames=3, backbone_warmup=1, cache_hit_iters=20,
                      text_iters=2, text_scaling_iters=1, text_scaling_points=((4, 4),), scaling_iters=30,
                      scaling_layers=(3,), scaling_image_tokens=(16,), scaling_top_k=(4,), scaling_chunk_len=(16,),
                      ros_trials=2, controller_duration_s=1.0)
