"""Configs of skill packs, pack sets and the task router (JSON beside safetensors, validated).

A *pack* is a head checkpoint trained on one task family alone plus ``pack.json`` (which
tasks it covers, where its data came from) and ``router_examples.safetensors`` (pooled
first-observation features of its own episodes: what the router of any set that includes
this pack learns from). A *pack set* is a directory with ``packs.json`` (the packs, in
order, and the refusal threshold), ``router/`` (the router) and ``packs/<name>/`` (copies of
the packs, so the set is self-contained and a policy node loads one path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

PACK_INFO_NAME = "pack.json"
ROUTER_EXAMPLES_NAME = "router_examples.safetensors"
PACK_SET_NAME = "packs.json"  # must equal policy_engine.PACK_SET_FILE
ROUTER_DIR = "router"
PACKS_DIR = "packs"
PACK_FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_pack_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{where} must be 1-64 chars of [A-Za-z0-9_.-] starting alphanumeric, got {name!r}")


@dataclass
class PackInfo:
    """``pack.json``: what one pack covers. The head itself is the checkpoint beside it."""

    name: str
    tasks: tuple[str, ...]  # task names whose episodes trained this head (and its router examples)
    num_episodes: int = 0
    num_samples: int = 0
    router_frames_per_episode: int = 1  # first frames of each episode kept as router examples
    source: str = ""  # feature dataset the pack was trained on (informational)
    format_version: int = PACK_FORMAT_VERSION

    def __post_init__(self) -> None:
        check_pack_name(self.name, "PackInfo.name")
        if not self.tasks or any(not isinstance(t, str) or not t for t in self.tasks):
            raise ValueError(f"PackInfo.tasks must be a non-empty list of task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"PackInfo.tasks has duplicates: {self.tasks!r}")
        if self.num_episodes < 0 or self.num_samples < 0:
            raise ValueError(f"PackInfo counts must be >= 0, got {self.num_episodes}/{self.num_samples}")
        if self.router_frames_per_episode < 1:
            raise ValueError(f"PackInfo.router_frames_per_episode must be >= 1, got {self.router_frames_per_episode}")
        if self.format_version != PACK_FORMAT_VERSION:
            raise ValueError(f"PackInfo.format_version {self.format_version} unsupported (this code reads {PACK_FORMAT_VERSION})")


@dataclass
class PackRef:
    name: str
    path: str  # relative to the pack-set directory, e.g. "packs/reach"

    def __post_init__(self) -> None:
        check_pack_name(self.name, "PackRef.name")
        p = PurePosixPath(self.path)
        if not self.path or p.is_absolute() or ".." in p.parts:
            raise ValueError(f"PackRef.path must be a relative path inside the pack set, got {self.path!r}")


@dataclass
class PackSetConfig:
    """``packs.json``: the packs of a combined policy and when it refuses to act."""

    packs: tuple[PackRef, ...]
    min_confidence: float = 0.8  # router probability below which the policy refuses (infer -> None)
    # Cosine similarity of the instruction to the nearest one the packs were trained on, below
    # which the policy refuses: the router's softmax always names *some* pack, even for a task
    # none covers. 0 disables the check (pack sets made before it existed).
    min_instruction_similarity: float = 0.0
    router: str = ROUTER_DIR
    format_version: int = PACK_FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.packs:
            raise ValueError("PackSetConfig.packs must list at least one pack")
        names = [p.name for p in self.packs]
        if len(set(names)) != len(names):
            raise ValueError(f"PackSetConfig.packs has duplicate names: {names}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"PackSetConfig.min_confidence must be in [0, 1], got {self.min_confidence}")
        if not 0.0 <= self.min_instruction_similarity <= 1.0:
            raise ValueError(f"PackSetConfig.min_instruction_similarity must be in [0, 1], got "
                             f"{self.min_instruction_similarity}")
        PackRef("router", self.router)  # same path rules
        if self.format_version != PACK_FORMAT_VERSION:
            raise ValueError(f"PackSetConfig.format_version {self.format_version} unsupported")

    @property
    def pack_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.packs)


@dataclass
class RouterConfig:
    """Router architecture + the feature slice it reads (saved as ``router/config.json``).

    Input: per contract layer, the mean of the image tokens and the masked mean of the
    instruction tokens (n_layers, 2, D); each vector RMS-normalised, layers mixed by learned
    softmax weights, then a small MLP -> one logit per pack.
    """

    pack_names: tuple[str, ...]
    num_layers: int  # contract layers (L)
    width: int  # D
    num_image_tokens: int  # first tokens of T are image tokens, the rest instruction tokens
    hidden: int = 64
    eps: float = 1e-6
    format_version: int = PACK_FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.pack_names:
            raise ValueError("RouterConfig.pack_names must not be empty")
        for name in ("num_layers", "width", "num_image_tokens", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"RouterConfig.eps must be > 0, got {self.eps}")
        if self.format_version != PACK_FORMAT_VERSION:
            raise ValueError(f"RouterConfig.format_version {self.format_version} unsupported")


@dataclass
class RouterTrainConfig:
    steps: int = 300  # full-batch AdamW steps (the data is a few hundred pooled vectors)
    lr: float = 3e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.2  # of episodes, per pack, for the reported validation accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RouterTrainConfig.steps must be >= 1, got {self.steps}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"RouterTrainConfig lr must be > 0 and weight_decay >= 0, got {self.lr}/{self.weight_decay}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"RouterTrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
