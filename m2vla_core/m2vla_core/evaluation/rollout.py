"""One closed-loop episode: observe, ask the agent for a chunk, execute part of it, repeat.

The agent is anything with ``reset()`` and ``act(observation) -> (H, A) chunk`` (the
in-process VLA agent, a scripted expert, a replay). Execution is receding-horizon: the first
``execute_steps`` waypoints of each chunk run at the env's control period, then the agent
sees a fresh observation.

With ``RolloutConfig.controller`` every chunk first passes the ROS controller's own checks
(``check_chunk_values``: shape, finite, joint limits + tolerance, speed); a chunk it would
refuse is not executed, the arm holds its last target, as on the robot. Without it the sim
clips every target into the URDF limits, which hides chunks the controller refuses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from m2vla_core.control.config import ControllerConfig
from m2vla_core.control.validation import check_chunk_values, reason_code


class Agent(Protocol):
    def reset(self) -> None: ...

    def act(self, observation) -> np.ndarray: ...  # (H, A)


@dataclass(frozen=True)
class RolloutConfig:
    max_steps: int = 120  # control steps (at the env's control period) before giving up
    execute_steps: int = 4  # waypoints of each chunk executed before re-planning
    keep_frames: bool = False  # keep camera frames for a GIF
    frame_every: int = 1
    controller: ControllerConfig | None = None  # check chunks as the ROS controller does (see above)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"RolloutConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.execute_steps < 1:
            raise ValueError(f"RolloutConfig.execute_steps must be >= 1, got {self.execute_steps}")
        if self.frame_every < 1:
            raise ValueError(f"RolloutConfig.frame_every must be >= 1, got {self.frame_every}")


@dataclass
class EpisodeOutcome:
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    act_ms: list[float] = field(default_factory=list)  # agent time per chunk
    refusals: list[str] = field(default_factory=list)  # reason codes of chunks the controller refused
    frames: list[np.ndarray] = field(default_factory=list)


def run_episode(env, agent: Agent, task: str, seed: int, config: RolloutConfig) -> EpisodeOutcome:
    obs = env.reset(task, seed)
    agent.reset()
    outcome = EpisodeOutcome(task=task, seed=seed, instruction=obs.instruction, success=False, steps=0)
    last_target = np.asarray(obs.joint_positions, dtype=np.float64)  # at home, before any command
    if config.keep_frames:
        outcome.frames.append(obs.image)
    while outcome.steps < config.max_steps:
        t0 = time.perf_counter()
        chunk = np.asarray(agent.act(obs))  # (H, A)
        outcome.act_ms.append((time.perf_counter() - t0) * 1e3)
        if chunk.ndim != 2 or not np.isfinite(chunk).all():
            break  # a broken chunk ends the episode as a failure; the robot does not execute it
        refusal = check_chunk_values(chunk, env.config.control_dt_s, config.controller) if config.controller else None
        if refusal is not None:
            outcome.refusals.append(reason_code(refusal))
            chunk = np.repeat(last_target[None], config.execute_steps, axis=0)  # hold
        for waypoint in chunk[: config.execute_steps]:
            last_target = waypoint
            obs = env.step(waypoint)
            outcome.steps += 1
            if config.keep_frames and outcome.steps % config.frame_every == 0:
                outcome.frames.append(obs.image)
            if env.success():
                outcome.success = True
                return outcome
            if outcome.steps >= config.max_steps:
                break
    return outcome
