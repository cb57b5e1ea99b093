"""Named architecture presets (the ablation variants) with strict did-you-mean lookup, and
``build_head``. Presets hold architecture only; data-derived fields come from the dataset."""

from __future__ import annotations

import difflib
from dataclasses import replace

from m2vla_core.heads.configuration_head import HeadArchConfig, HeadConfig
from m2vla_core.heads.mol.configuration_mol import MoLConfig

DEFAULT_PRESET = "mol+msm"


def _arch(mix: str, action_head: str) -> HeadArchConfig:
    return HeadArchConfig(mol=MoLConfig(mix=mix), action_head=action_head)


# name -> (factory, one-line description)
PRESETS = {
    "last+mlp": (lambda: _arch("last", "mlp"), "last listed layer, MLP straight to H x A"),
    "middle+mlp": (lambda: _arch("fixed", "mlp"), "one fixed middle layer, MLP"),
    "uniform+mlp": (lambda: _arch("uniform", "mlp"), "uniform average of the layers, MLP"),
    "scalar+mlp": (lambda: _arch("scalar", "mlp"), "static learned softmax layer mix, MLP"),
    "mol+mlp": (lambda: _arch("router", "mlp"), "routed Mixture of Layers, MLP"),
    "last+msm": (lambda: _arch("last", "msm"), "last layer, retrieval Meta Skill Module"),
    "mol+msm": (lambda: _arch("router", "msm"), "routed MoL + retrieval MSM, smooth decode (default)"),
    "mol+skills": (lambda: _arch("router", "skills"), "routed MoL + smooth-basis meta-skills"),
}


def get_preset(name: str) -> HeadArchConfig:
    """Architecture of preset ``name``; unknown names raise KeyError with a suggestion."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown head preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    return PRESETS[name][0]()


def small_head_config(preset: str = DEFAULT_PRESET, *, layers: tuple[int, ...] = (1, 2, 3), num_image_tokens: int = 4,
                      num_text_tokens: int = 4, width: int = 32, state_dim: int = 8, action_space: str = "joint",
                      action_dim: int = 8, chunk_len: int = 16, d_model: int = 32, memory_size: int = 256) -> HeadConfig:
    """A very small head config (tests, smoke runs): preset architecture shrunk to ``d_model``."""
    from m2vla_core.features import FeatureContract

    arch = get_preset(preset)
    arch = replace(arch, d_model=d_model, mol=replace(arch.mol, num_queries=4, router_hidden=32),
                   mlp=replace(arch.mlp, hidden=64), msm=replace(arch.msm, memory_size=memory_size, num_action_tokens=2,
                                                                 num_blocks=1),
                   skills=replace(arch.skills, num_skills=8, hidden=64))
    contract = FeatureContract(layers=layers, num_image_tokens=num_image_tokens, num_text_tokens=num_text_tokens, width=width)
    return HeadConfig(contract=contract, state_dim=state_dim, action_space=action_space, action_dim=action_dim,
                      chunk_len=chunk_len, dt_s=0.1, backbone_id="test-backbone", backbone_digest="ab" * 32, arch=arch)


def build_head(config: HeadConfig):
    from m2vla_core.heads.policy_head import PolicyHead  # lazy: keeps config-only imports free of torch modules

    return PolicyHead(config)


def with_arch(config: HeadConfig, arch: HeadArchConfig) -> HeadConfig:
    """Same data interface, another architecture (re-validated)."""
    return replace(config, arch=arch)
