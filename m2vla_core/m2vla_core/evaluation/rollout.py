"""One closed-loop episode: observe, ask the agent for a chunk, execute part of it, repeat.

The agent is anything with ``reset()`` and ``act(observation) -> (H, A) chunk`` (the
in-process VLA agent, a scripted expert, a replay). Execution is receding-horizon: the first
``execute_steps`` waypoints of each chunk run at the env's control period, then the agent
sees a fresh observation.

With ``RolloutConfig.controller`` every chunk first passes the ROS controller's own checks
(``check_chunk_values``: shape, finite, joint limits + tolerance, speed); a chunk it would
refuse is not executed, the arm holds its last target, as on the robot. Without it the sim
clips every target into the URDF limits, which hides chunks the controller refuses.

Latency (``RolloutConfig.latency_steps`` = K > 0) emulates the ROS graph, where a chunk reaches
the controller some time after the camera frame it was computed on and the controller indexes
it by that frame's stamp (``ChunkTrajectory``: waypoint i is due at observation + (i + 1) dt).
The agent is still asked every ``execute_steps`` steps on the observation of that step, but
its chunk reaches the arm K steps later: until then the arm keeps following the chunk already
there (holds at the last target when there is none, as at the start of an episode), and the
new chunk runs from its waypoint K on (waypoints 0..K-1 were due while it was on its way).
Re-planning does not wait for the chunk in flight: several can be on their way when K >=
``execute_steps``. The controller's age check (``max_chunk_age_s``) applies to the K steps.
K = 0 is the synchronous rollout above, step for step.

Ensembling (``RolloutConfig.ensemble_chunks`` = N > 1) does what the controller does with the
same settings: each step's target is the mean of the newest N chunks that have reached the arm and
still cover that step, weighted by ``ensemble_decay`` as the controller weighs them
(``ChunkEnsemble``; a chunk covers the steps of its waypoints). A refused chunk empties the
ensemble: the arm holds, as with one chunk.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from m2vla_core.control.config import ControllerConfig, check_ensemble_chunks, check_ensemble_decay
from m2vla_core.control.trajectory import ChunkEnsemble, ChunkTrajectory
from m2vla_core.control.validation import check_chunk_timing, check_chunk_values, reason_code


class Agent(Protocol):
    def reset(self) -> None: ...

    def act(self, observation) -> np.ndarray: ...  # (H, A)


# Eval's defaults and the ROS graph's: re-plan every 4 waypoints (policy.yaml control_rate_hz =
# 1 / (4 x 0.1 s)) and follow the mean of the newest 4 chunks (controller.yaml ensemble_chunks).
# Following each chunk alone, 4 / 8 / 12 waypoints succeeded on 60.8 / 69.2 / 72.5 % of the same
# 120 held-out episodes (an earlier head; "Re-planning less often"); averaged, every 4 beat the
# newest chunk every 12 on 240 (docs/results.md, "Averaging overlapping chunks").
EXECUTE_STEPS = 4
ENSEMBLE_CHUNKS = 4  # chunks averaged per step; 1 = the newest alone
# their weights exp(-0.7 i), i = 0 for the oldest (controller.yaml ensemble_decay): 1, 0.50, 0.25,
# 0.12 for four chunks; against equal weights, docs/results.md "Weighing the older plans more"
ENSEMBLE_DECAY = 0.7


def check_latency_steps(value, owner: str) -> None:
    """The one check of a ``latency_steps`` field (``RolloutConfig`` and ``EvalConfig``, which
    refuses it before any policy loads)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}.latency_steps must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class RolloutConfig:
    max_steps: int = 120  # control steps (at the env's control period) before giving up
    execute_steps: int = EXECUTE_STEPS  # waypoints of each chunk executed before re-planning
    keep_frames: bool = False  # keep camera frames for a GIF
    frame_every: int = 1
    controller: ControllerConfig | None = None  # check chunks as the ROS controller does (see above)
    # control steps from an observation to its chunk reaching the arm (see above); needs chunks of
    # at least latency_steps + execute_steps waypoints
    latency_steps: int = 0
    # follow the mean of the newest N chunks that cover a step (see above); 1 here, a plain receding
    # horizon for any agent; `m2vla eval` passes the graph's ENSEMBLE_CHUNKS
    ensemble_chunks: int = 1
    ensemble_decay: float = 0.0  # their weights (ControllerConfig.ensemble_decay); eval passes ENSEMBLE_DECAY

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"RolloutConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.execute_steps < 1:
            raise ValueError(f"RolloutConfig.execute_steps must be >= 1, got {self.execute_steps}")
        if self.frame_every < 1:
            raise ValueError(f"RolloutConfig.frame_every must be >= 1, got {self.frame_every}")
        check_latency_steps(self.latency_steps, "RolloutConfig")
        check_ensemble_chunks(self.ensemble_chunks, "RolloutConfig")
        check_ensemble_decay(self.ensemble_decay, "RolloutConfig")


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


def check_latency_fits(horizon: int, config: RolloutConfig) -> None:
    """Raise ValueError unless a chunk of ``horizon`` waypoints covers the latency and the steps
    executed from it (waypoints latency_steps .. latency_steps + execute_steps - 1)."""
    k, e = config.latency_steps, config.execute_steps
    if k and horizon < k + e:
        raise ValueError(f"RolloutConfig.latency_steps {k} needs chunks of at least latency_steps + execute_steps "
                         f"= {k + e} waypoints, the agent's have {horizon}: use latency_steps <= {max(horizon - e, 0)} "
                         f"or fewer execute_steps")


def run_episode(env, agent: Agent, task: str, seed: int, config: RolloutConfig) -> EpisodeOutcome:
    obs = env.reset(task, seed)
    agent.reset()
    outcome = EpisodeOutcome(task=task, seed=seed, instruction=obs.instruction, success=False, steps=0)
    last_target = np.asarray(obs.joint_positions, dtype=np.float64)  # at home, before any command
    latency = config.latency_steps
    dt_s = env.config.control_dt_s
    # what the arm follows: (waypoints (H, A), step of their observation); None until one arrives
    active: tuple[np.ndarray, int] | None = None
    # chunks on their way, oldest first: (waypoints, or None for a refused one = hold, observation step)
    in_flight: deque[tuple[np.ndarray | None, int]] = deque()
    # with ensembling: the newest chunks that reached the arm, as trajectories over control steps
    members: deque[ChunkTrajectory] = deque(maxlen=config.ensemble_chunks)
    if config.keep_frames:
        outcome.frames.append(obs.image)
    while outcome.steps < config.max_steps:
        t0 = time.perf_counter()
        chunk = np.asarray(agent.act(obs))  # (H, A)
        outcome.act_ms.append((time.perf_counter() - t0) * 1e3)
        if chunk.ndim != 2 or not np.isfinite(chunk).all():
            break  # a broken chunk ends the episode as a failure; the robot does not execute it
        check_latency_fits(len(chunk), config)
        refusal = None
        if config.controller:
            refusal = check_chunk_values(chunk, dt_s, config.controller)
            # the observation is latency * dt old when the chunk arrives (max_chunk_age_s)
            refusal = refusal or check_chunk_timing(obs.time_s, obs.time_s + latency * dt_s, config.controller)
        if refusal is not None:
            outcome.refusals.append(reason_code(refusal))
        in_flight.append((None if refusal is not None else chunk, outcome.steps))
        # a refused chunk holds for execute_steps steps; an accepted one runs at most its own length
        for _ in range(config.execute_steps if refusal is not None else min(config.execute_steps, len(chunk))):
            if in_flight and outcome.steps >= in_flight[0][1] + latency:  # the oldest one reaches the arm
                values, observed_step = in_flight.popleft()
                if values is None:  # refused: hold where the arm is
                    values, observed_step = last_target[None], outcome.steps  # (1, A)
                    members.clear()
                elif config.ensemble_chunks > 1:  # waypoint i is due at step observed_step + i + 1, as on the robot
                    members.append(ChunkTrajectory(values, 1.0, float(observed_step), "linear"))
                active = (values, observed_step)
            if active is None:
                waypoint = last_target  # nothing has reached the arm yet: hold
            elif members:
                waypoint = ChunkEnsemble(members, config.ensemble_decay).at(outcome.steps + 1.0)
            else:
                values, observed_step = active
                # indexed by the time since its observation; past its end it stays at the last waypoint
                waypoint = values[min(outcome.steps - observed_step, len(values) - 1)]
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
