"""Trainable heads on frozen VLM features: Mixture of Layers + action heads (MLP, retrieval
Meta Skill Module, smooth-basis skills), their checkpoints and presets."""

from m2vla_core.heads.checkpoint import CheckpointError, check_backbone, load_head, load_head_config, save_head
from m2vla_core.heads.configuration_head import HeadArchConfig, HeadConfig, MLPHeadConfig
from m2vla_core.heads.factory import DEFAULT_PRESET, PRESETS, build_head, get_preset
from m2vla_core.heads.mol.configuration_mol import MoLConfig
from m2vla_core.heads.msm.configuration_msm import MSMConfig
from m2vla_core.heads.policy_head import ContractError, PolicyHead
from m2vla_core.heads.skills.configuration_skills import SkillsConfig

__all__ = [
    "CheckpointError", "ContractError", "DEFAULT_PRESET", "HeadArchConfig", "HeadConfig", "MLPHeadConfig", "MSMConfig",
    "MoLConfig", "PRESETS", "PolicyHead", "SkillsConfig", "build_head", "check_backbone", "get_preset", "load_head",
    "load_head_config", "save_head",
]
