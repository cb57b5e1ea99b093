"""Takeover episodes: DAgger-style data from the states a policy reaches on its own.

A head trained on expert demonstrations is queried on its own states at run time, and there its
small errors compound (docs/results.md, "Traced failures"): the lowering onto a base cube is 1 cm
off open loop and 2-3 cm off closed loop. A takeover episode lets the policy drive a layout for a
random number of control steps, exactly as ``m2vla eval`` runs it (re-planning, ensembling and
the ROS controller's chunk checks: a chunk the controller would refuse holds the arm), then
hands the arm to the scripted expert, which plans from the state the policy left
(``make_expert(resume=True)``). Only the expert's part is recorded: its first frames are the
policy's states, its labels the expert's. Trained together with the demonstrations, these show
the head how to recover from where it actually goes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from m2vla_core.control.config import get_preset
from m2vla_core.evaluation.rollout import ENSEMBLE_CHUNKS, ENSEMBLE_DECAY, EXECUTE_STEPS, RolloutConfig, run_episode
from m2vla_core.sim.experts import ExpertConfig, drive_expert, make_expert
from m2vla_core.sim.lerobot_io import Episode
from m2vla_core.sim.record import EpisodeCollector
from m2vla_core.sim.scene import SimConfig


@dataclass(frozen=True)
class TakeoverConfig:
    """The policy drives for a number of control steps drawn uniformly from [min_steps, max_steps]
    (per layout, from a generator seeded by the layout's seed), re-planning as ``m2vla eval`` does."""

    min_steps: int = 10
    max_steps: int = 70
    execute_steps: int = EXECUTE_STEPS
    ensemble_chunks: int = ENSEMBLE_CHUNKS
    ensemble_decay: float = ENSEMBLE_DECAY

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"TakeoverConfig needs 1 <= min_steps <= max_steps, got {self.min_steps}, "
                             f"{self.max_steps}")

    def steps_for(self, seed: int, stream: int = 0) -> int:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 104729, int(stream)]))
        return int(rng.integers(self.min_steps, self.max_steps + 1))

    def rollout(self, steps: int) -> RolloutConfig:
        return RolloutConfig(max_steps=steps, execute_steps=self.execute_steps, ensemble_chunks=self.ensemble_chunks,
                             ensemble_decay=self.ensemble_decay, controller=get_preset("panda"))


@dataclass
class TakeoverEpisode:
    episode: Episode | None  # None: the policy finished the task before the takeover, nothing to record
    takeover_step: int
    policy_success: bool


def record_takeover_episode(env, agent, task: str, seed: int, expert_config: ExpertConfig,
                            config: TakeoverConfig) -> TakeoverEpisode:
    """The policy drives ``task``/``seed`` for ``config.steps_for(seed)`` steps, then the expert
    finishes from there; returns the expert's part as an episode (``episode.success``: the task
    was done when the expert's plan ended)."""
    steps = config.steps_for(seed, expert_config.noise_stream)
    outcome = run_episode(env, agent, task, seed, config.rollout(steps))
    if outcome.success:
        return TakeoverEpisode(None, outcome.steps, True)
    obs = env.observe()
    collector = EpisodeCollector()
    success, _ = drive_expert(env, obs, make_expert(env, expert_config, resume=True), seed, on_step=collector)
    return TakeoverEpisode(collector.episode(env, task, seed, success), outcome.steps, False)


class TakeoverSource:
    """``record_dataset``'s episode source for ``m2vla record --policy``: one takeover episode per
    layout; ``solved`` counts, per task, the layouts the policy finished before its takeover."""

    def __init__(self, agent, config: TakeoverConfig, policy: str) -> None:
        self.agent = agent
        self.config = config
        self.policy = policy
        self.solved: dict[str, int] = {}

    @classmethod
    def load(cls, policy: str, steps: str) -> "TakeoverSource":
        """``policy``: a head checkpoint directory or 'default'; ``steps``: 'MIN:MAX'."""
        from m2vla_core.evaluation.agent import VLAAgent

        low, sep, high = steps.partition(":")
        try:
            config = TakeoverConfig(min_steps=int(low), max_steps=int(high))
        except ValueError as exc:
            bad = "" if sep and low.strip().isdigit() and high.strip().isdigit() else "expected MIN:MAX, "
            raise ValueError(f"--takeover-steps {steps!r}: {bad}{exc}") from None
        return cls(VLAAgent.load(None if policy == "default" else policy), config, policy)

    def sim_config(self, recorder: SimConfig, image_size: int | None) -> SimConfig:
        """The recorder's simulator with the camera and control period the policy was trained on; an
        explicitly different image size is refused (the policy would see frames it never saw)."""
        own = self.agent.sim_config()
        if image_size and image_size != own.image_width:
            raise ValueError(f"--image-size {image_size}: the policy sees {own.image_width} px frames; leave "
                             "--image-size out with --policy")
        if abs(recorder.control_dt_s - own.control_dt_s) > 1e-9:
            raise ValueError(f"--control-dt {recorder.control_dt_s}: the policy was trained at {own.control_dt_s} s")
        return dataclasses.replace(recorder, image_width=own.image_width, image_height=own.image_height)

    def __call__(self, env, task: str, seed: int, expert_config: ExpertConfig) -> Episode | None:
        result = record_takeover_episode(env, self.agent, task, seed, expert_config, self.config)
        self.solved[task] = self.solved.get(task, 0) + int(result.policy_success)
        return result.episode

    def info(self) -> dict:
        """What info.json records about how the dataset was made (a layout's takeover step is
        ``TakeoverConfig.steps_for(seed, noise stream)``)."""
        return {"takeover": {"policy": self.policy, **dataclasses.asdict(self.config)}}
