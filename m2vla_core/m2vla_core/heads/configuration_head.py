"""The whole head's configuration: what it reads (feature contract, state), what it emits
(action space, chunk length, command period), which backbone it was trained on, and its
architecture. Saved as the checkpoint's ``config.json`` and checked at every load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from m2vla_core.features import FeatureContract
from m2vla_core.heads.mol.configuration_mol import MoLConfig
from m2vla_core.heads.msm.configuration_msm import MSMConfig
from m2vla_core.heads.skills.configuration_skills import SkillsConfig

ACTION_SPACES = ("joint", "eef")  # joint: arm joint positions + gripper; eef: 6-D pose delta + gripper
EEF_ACTION_DIM = 7
ACTION_HEADS = ("mlp", "msm", "skills")
ABSOLUTE_ACTION_NAMES = ("gripper_opening",)  # never offsets from the state (arch.relative_actions)
HEAD_FORMAT_VERSION = 1


@dataclass
class MLPHeadConfig:
    hidden: int = 256
    num_layers: int = 2

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.num_layers < 1:
            raise ValueError(f"MLPHeadConfig hidden/num_layers must be >= 1, got {self.hidden}/{self.num_layers}")


@dataclass
class HeadArchConfig:
    """Architecture only (no data-derived fields): what presets and ablations vary."""

    d_model: int = 128
    mol: MoLConfig = field(default_factory=MoLConfig)
    action_head: str = "msm"
    mlp: MLPHeadConfig = field(default_factory=MLPHeadConfig)
    msm: MSMConfig = field(default_factory=MSMConfig)
    skills: SkillsConfig = field(default_factory=SkillsConfig)
    # Weight of an auxiliary loss: predict the dataset's aux targets (e.g. every object's x, y) from
    # the MoL latent. The action loss alone never made the latent say where the cube is; this
    # supervises it directly. 0 = off. Training only: the deployed head reads and emits the same.
    aux_weight: float = 0.0
    # "panda": the head also reads the gripper's position, computed from the joint state by the
    # Panda's forward kinematics inside the head, and (with the named objects' x, y in the state)
    # the vectors from the gripper to them (heads/gripper_geometry.py). "" = the state as given.
    gripper_features: str = ""
    # True: the layers predict each joint's waypoints as offsets from its current position (the
    # state's first A entries are the action's quantities), and the head adds the state back, so
    # it still takes and returns absolute targets. A correction of a centimetre is then a large
    # share of the normalised target, not a rounding error on the arm's whole range of motion.
    # ``ABSOLUTE_ACTION_NAMES`` (the gripper: commanded open or closed, and held apart by a cube
    # in its fingers) stay absolute.
    relative_actions: bool = False

    def __post_init__(self) -> None:
        from m2vla_core.heads.gripper_geometry import GRIPPER_FEATURE_SETS

        if self.gripper_features not in GRIPPER_FEATURE_SETS:
            raise ValueError(f"HeadArchConfig.gripper_features must be one of {GRIPPER_FEATURE_SETS}, "
                             f"got {self.gripper_features!r}")
        if self.d_model < 1:
            raise ValueError(f"HeadArchConfig.d_model must be >= 1, got {self.d_model}")
        if not (math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise ValueError(f"HeadArchConfig.aux_weight must be finite and >= 0, got {self.aux_weight}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"HeadArchConfig.action_head must be one of {ACTION_HEADS}, got {self.action_head!r}")
        for name, heads in (("mol", self.mol.num_heads), ("msm", self.msm.num_heads)):
            if self.d_model % heads:
                raise ValueError(f"HeadArchConfig.d_model={self.d_model} not divisible by {name}.num_heads={heads}")


@dataclass
class HeadConfig:
    contract: FeatureContract
    state_dim: int  # S: robot joint positions fed to the head
    action_space: str  # "joint" | "eef"
    action_dim: int  # A: joint -> arm joints + gripper; eef -> 7
    chunk_len: int  # H waypoints per chunk
    dt_s: float  # [s] time between chunk waypoints
    backbone_id: str  # e.g. "tiny-qwen2vl"; a head is refused on another backbone
    backbone_digest: str  # weights digest (sha256 hex) of the backbone the features came from
    arch: HeadArchConfig = field(default_factory=HeadArchConfig)
    state_names: tuple[str, ...] = ()  # optional joint names, len == state_dim
    action_names: tuple[str, ...] = ()  # optional, len == action_dim
    aux_target_names: tuple[str, ...] = ()  # what the auxiliary predictor emits; set iff arch.aux_weight > 0
    format_version: int = HEAD_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.state_dim < 1:
            raise ValueError(f"HeadConfig.state_dim must be >= 1, got {self.state_dim}")
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"HeadConfig.action_space must be one of {ACTION_SPACES}, got {self.action_space!r}")
        if self.action_space == "eef" and self.action_dim != EEF_ACTION_DIM:
            raise ValueError(f"HeadConfig.action_dim must be {EEF_ACTION_DIM} for action_space='eef', got {self.action_dim}")
        if self.action_dim < 2:
            raise ValueError(f"HeadConfig.action_dim must be >= 2 (joints + gripper), got {self.action_dim}")
        if self.chunk_len < 2:
            raise ValueError(f"HeadConfig.chunk_len must be >= 2, got {self.chunk_len}")
        if not self.dt_s > 0:
            raise ValueError(f"HeadConfig.dt_s must be > 0, got {self.dt_s}")
        if self.state_names and len(self.state_names) != self.state_dim:
            raise ValueError(f"HeadConfig.state_names has {len(self.state_names)} names, state_dim={self.state_dim}")
        if self.arch.relative_actions and (not self.action_names
                                           or tuple(self.state_names[:self.action_dim]) != tuple(self.action_names)):
            raise ValueError("HeadConfig.arch.relative_actions needs a state whose first action_dim entries are named "
                             f"as the actions {self.action_names}; the state is {self.state_names}")
        if self.arch.gripper_features and len(self.state_names) != self.state_dim:
            raise ValueError(f"HeadConfig.arch.gripper_features={self.arch.gripper_features!r} needs the state's names "
                             "(which entries are the arm's joints)")
        if self.action_names and len(self.action_names) != self.action_dim:
            raise ValueError(f"HeadConfig.action_names has {len(self.action_names)} names, action_dim={self.action_dim}")
        if bool(self.aux_target_names) != (self.arch.aux_weight > 0):
            raise ValueError(f"HeadConfig.aux_target_names {self.aux_target_names} and arch.aux_weight "
                             f"{self.arch.aux_weight}: a head has auxiliary targets exactly when it weighs their loss")
        if self.format_version != HEAD_FORMAT_VERSION:
            raise ValueError(f"HeadConfig.format_version {self.format_version} unsupported (this code reads {HEAD_FORMAT_VERSION})")
        layers = self.contract.layers
        mol, msm, skills = self.arch.mol, self.arch.msm, self.arch.skills
        for name, value in (("arch.mol.fixed_layer", mol.fixed_layer), ("arch.mol.router_layer", mol.router_layer),
                            ("arch.msm.key_layer", msm.key_layer)):
            if value != -1 and value not in layers:
                raise ValueError(f"HeadConfig.{name}={value} is not a contract layer {layers}")
        if mol.top_k > len(layers):
            raise ValueError(f"HeadConfig.arch.mol.top_k={mol.top_k} exceeds the {len(layers)} contract layers")
        for name, nb in (("arch.msm.num_basis", msm.num_basis), ("arch.skills.num_basis", skills.num_basis)):
            if nb > self.chunk_len:
                raise ValueError(f"HeadConfig.{name}={nb} exceeds chunk_len={self.chunk_len}")

    def layer_position(self, hidden_index: int, default: str) -> int:
        """Position in ``contract.layers`` of a hidden-state index; -1 -> "first" | "middle" | "last"."""
        layers = self.contract.layers
        if hidden_index != -1:
            return layers.index(hidden_index)
        return {"first": 0, "middle": len(layers) // 2, "last": len(layers) - 1}[default]
