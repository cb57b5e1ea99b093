"""Configuration of the smooth-basis meta-skill decoder (our addition; an ablation row)."""

from __future__ import annotations

from dataclasses import dataclass

from m2vla_core.heads.skills.basis import BASIS_KINDS


@dataclass
class SkillsConfig:
    num_skills: int = 16  # K learned trajectory templates
    top_k: int = 0  # 0 = soft mixture of all skills; k > 0 = only the k best skills per sample
    basis: str = "dct"
    num_basis: int = 6  # N_b coefficients per action dimension (<< chunk_len)
    hidden: int = 256
    residual_scale: float = 0.1  # the free residual in the basis stays small next to the skills

    def __post_init__(self) -> None:
        for name in ("num_skills", "num_basis", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"SkillsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.top_k <= self.num_skills:
            raise ValueError(f"SkillsConfig.top_k must be in [0, num_skills={self.num_skills}], got {self.top_k}")
        if self.basis not in BASIS_KINDS:
            raise ValueError(f"SkillsConfig.basis must be one of {BASIS_KINDS}, got {self.basis!r}")
        if self.residual_scale < 0:
            raise ValueError(f"SkillsConfig.residual_scale must be >= 0, got {self.residual_scale}")
