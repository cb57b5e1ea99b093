"""Latency emulation (``RolloutConfig.latency_steps``, ``m2vla eval --latency-steps``) and
ensembling (``RolloutConfig.ensemble_chunks``) in the evaluation rollout.

The ROS controller indexes a chunk by the time since its observation, so a chunk that reaches
it K control steps late runs from its waypoint K, and the arm follows the chunk already there
in the meantime. A scripted agent writes into every waypoint which observation step and which
waypoint index it is, so the executed targets (recorded on the real PyBullet env) say exactly
which chunk and waypoint the arm was sent at every step.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from m2vla_core.control.config import get_preset
from m2vla_core.evaluation.cli import EvalConfig, EvalReport, eval_main, format_table
from m2vla_core.evaluation.rollout import RolloutConfig, run_episode
from m2vla_core.sim import SimConfig, TaskEnv

TASK, SEED = "reach_above", 3
STEP_RAD = 0.01  # per observation step (joint 1) and per waypoint index (joint 2): slow, inside every limit


class RecordingEnv:
    """The real env; every target sent to ``step`` is kept."""

    def __init__(self, env: TaskEnv) -> None:
        self.env = env
        self.sent: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, task, seed):
        self.sent = []
        return self.env.reset(task, seed)

    def step(self, action):
        self.sent.append(np.array(action, dtype=np.float64))
        return self.env.step(action)


class StampedChunks:
    """Chunks of ``horizon`` waypoints; waypoint i of the chunk asked at observation step q is the
    episode's start pose + (q + 1) * STEP_RAD on joint 1 and + (i + 1) * STEP_RAD on joint 2.
    ``refuse_at``: observation steps whose chunk closes the gripper past its limit (refused)."""

    def __init__(self, horizon: int, refuse_at: tuple[int, ...] = ()) -> None:
        self.horizon, self.refuse_at = horizon, refuse_at
        self.start: np.ndarray | None = None

    def reset(self) -> None:
        self.start = None

    def waypoint(self, q: int, i: int) -> np.ndarray:
        target = self.start.copy()
        target[0] += (q + 1) * STEP_RAD
        target[1] += (i + 1) * STEP_RAD
        return target

    def act(self, observation) -> np.ndarray:
        if self.start is None:  # the first observation of the episode
            self.start = np.asarray(observation.joint_positions, dtype=np.float64).copy()
        chunk = np.stack([self.waypoint(observation.step, i) for i in range(self.horizon)])  # (H, 8)
        if observation.step in self.refuse_at:
            chunk[:, 7] = -0.06
        return chunk

    def decode(self, target: np.ndarray) -> tuple[int, int] | None:
        """(observation step, waypoint index) of an executed target; None for the start pose."""
        if np.array_equal(target, self.start):
            return None
        q = int(round((target[0] - self.start[0]) / STEP_RAD)) - 1
        i = int(round((target[1] - self.start[1]) / STEP_RAD)) - 1
        assert np.array_equal(target, self.waypoint(q, i)), "an executed target is not a waypoint of any chunk"
        return q, i


@pytest.fixture(scope="module")
def env():
    with TaskEnv(SimConfig(render=False)) as e:
        yield RecordingEnv(e)


def executed(env, agent, **rollout) -> tuple[list, object]:
    outcome = run_episode(env, agent, TASK, SEED, RolloutConfig(controller=get_preset("panda"), **rollout))
    return [agent.decode(t) for t in env.sent], outcome


def test_without_latency_each_chunk_runs_from_its_first_waypoint_on_the_observation_it_answers(env):
    agent = StampedChunks(horizon=8)
    steps, outcome = executed(env, agent, max_steps=10, execute_steps=3)
    assert steps == [(0, 0), (0, 1), (0, 2), (3, 0), (3, 1), (3, 2), (6, 0), (6, 1), (6, 2), (9, 0)]
    assert outcome.steps == 10 and len(outcome.act_ms) == 4 and outcome.refusals == []


def test_a_late_chunk_runs_from_waypoint_k_while_the_previous_chunk_keeps_the_arm_moving(env):
    agent = StampedChunks(horizon=8)
    steps, outcome = executed(env, agent, max_steps=12, execute_steps=3, latency_steps=2)
    assert steps == [None, None,  # nothing has arrived yet: the arm holds its start pose
                     (0, 2), (0, 3), (0, 4),  # chunk 0 arrives 2 steps late; at 3 chunk 3 is asked...
                     (3, 2), (3, 3), (3, 4),  # ...and reaches the arm at 5, from its waypoint 2
                     (6, 2), (6, 3), (6, 4),
                     (9, 2)]
    assert len(outcome.act_ms) == 4  # re-planning keeps its cadence: it does not wait for the chunk in flight


def test_latency_longer_than_the_replanning_period_keeps_several_chunks_on_their_way(env):
    agent = StampedChunks(horizon=8)
    steps, _ = executed(env, agent, max_steps=10, execute_steps=2, latency_steps=4)
    assert steps == [None, None, None, None, (0, 4), (0, 5), (2, 4), (2, 5), (4, 4), (4, 5)]


def test_a_refused_late_chunk_holds_the_arm_from_when_it_would_have_arrived(env):
    agent = StampedChunks(horizon=8, refuse_at=(3,))
    steps, outcome = executed(env, agent, max_steps=10, execute_steps=3, latency_steps=2)
    assert outcome.refusals == ["out_of_limits"]
    assert steps == [None, None, (0, 2), (0, 3), (0, 4), (0, 4), (0, 4), (0, 4), (6, 2), (6, 3)]


def test_a_chunk_older_than_the_controllers_max_age_on_arrival_is_refused(env):
    agent = StampedChunks(horizon=16)  # 11 steps of 0.1 s = 1.1 s > max_chunk_age_s 1.0 s
    steps, outcome = executed(env, agent, max_steps=14, execute_steps=1, latency_steps=11)
    assert outcome.refusals and set(outcome.refusals) == {"stale_stamp"}
    assert steps == [None] * 14


def test_latency_that_the_chunk_cannot_cover_is_refused_with_the_bound(env):
    agent = StampedChunks(horizon=8)
    with pytest.raises(ValueError, match=r"latency_steps 6 needs chunks of at least .* = 10 waypoints.* have 8"):
        executed(env, agent, max_steps=10, execute_steps=4, latency_steps=6)
    steps, _ = executed(env, agent, max_steps=6, execute_steps=4, latency_steps=4)  # 4 + 4 = 8: the last fits
    assert steps[4:] == [(0, 4), (0, 5)]


def test_with_an_ensemble_each_step_is_the_mean_of_the_newest_chunks_covering_it(env):
    agent = StampedChunks(horizon=6)
    run_episode(env, agent, TASK, SEED, RolloutConfig(controller=get_preset("panda"), max_steps=9, execute_steps=2,
                                                      ensemble_chunks=2))
    for s, sent in enumerate(env.sent):
        q = s - s % 2  # the newest chunk was asked at q; the one before at q - 2 (covers s if s - (q - 2) < 6)
        covering = [(q, s - q)] + ([(q - 2, s - q + 2)] if q >= 2 else [])
        np.testing.assert_allclose(sent, np.mean([agent.waypoint(*c) for c in covering], axis=0), atol=1e-12,
                                   err_msg=f"step {s}")
    weighted = StampedChunks(horizon=6)
    run_episode(env, weighted, TASK, SEED, RolloutConfig(controller=get_preset("panda"), max_steps=9, execute_steps=2,
                                                         ensemble_chunks=2, ensemble_decay=0.7))
    w = np.exp(-0.7)  # the newer chunk's weight against the older one's 1
    np.testing.assert_allclose(env.sent[3], (weighted.waypoint(0, 3) + w * weighted.waypoint(2, 1)) / (1 + w),
                               atol=1e-12)
    alone = StampedChunks(horizon=6)
    steps, _ = executed(env, alone, max_steps=9, execute_steps=2, ensemble_chunks=1)
    assert steps[2:4] == [(2, 0), (2, 1)]  # one chunk: the newest alone


def test_a_refused_chunk_empties_the_ensemble_the_arm_holds_then_follows_the_next_chunk_alone(env):
    agent = StampedChunks(horizon=8, refuse_at=(2,))
    run_episode(env, agent, TASK, SEED, RolloutConfig(controller=get_preset("panda"), max_steps=6, execute_steps=2,
                                                      ensemble_chunks=4))
    np.testing.assert_array_equal(env.sent[2], env.sent[1])  # refused at 2: hold where the arm was
    np.testing.assert_array_equal(env.sent[3], env.sent[1])
    np.testing.assert_array_equal(env.sent[4], agent.waypoint(4, 0))  # not averaged with chunk 0 any more


@pytest.mark.parametrize("bad", [0, 2.5, True])
def test_invalid_ensemble_sizes_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="RolloutConfig.ensemble_chunks"):
        RolloutConfig(ensemble_chunks=bad)
    with pytest.raises(ValueError, match="EvalConfig.ensemble_chunks"):
        EvalConfig(ensemble_chunks=bad)


@pytest.mark.parametrize("bad", [-0.5, float("inf"), 10.5, True])
def test_invalid_ensemble_decays_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="RolloutConfig.ensemble_decay"):
        RolloutConfig(ensemble_decay=bad)
    with pytest.raises(ValueError, match="EvalConfig.ensemble_decay"):
        EvalConfig(ensemble_decay=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_invalid_latency_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="RolloutConfig.latency_steps"):
        RolloutConfig(latency_steps=bad)
    with pytest.raises(ValueError, match="EvalConfig.latency_steps"):
        EvalConfig(latency_steps=bad)


def test_eval_cli_refuses_a_negative_latency_before_loading_anything(capsys):
    assert eval_main(["--latency-steps", "-2", "--no-progress"]) == 2
    assert "latency_steps must be an int >= 0" in capsys.readouterr().err


def test_eval_report_records_the_latency_and_the_cadence_in_its_config_and_table_footer():
    config = EvalConfig(latency_steps=3, tasks=("reach_above",))
    report = EvalReport(policy="p", backend="onnxruntime", mean_success=0.5, success={"reach_above": 0.5},
                        episodes={"reach_above": [{}, {}]}, seeds={"reach_above": [1000, 1001]}, act_ms_p50=1.0,
                        act_ms_p99=2.0, head_us_p50=1.0, head_us_p99=2.0, backbone_ms_p50=1.0, seconds=1.0,
                        config=asdict(config))
    assert report.to_json()["config"]["latency_steps"] == 3
    assert "reached the arm 3 control steps after its observation" in format_table(report)
    synchronous = EvalReport(**{**report.__dict__, "config": asdict(EvalConfig())})
    assert "reached the arm" not in format_table(synchronous)
    assert "re-planned every 4 waypoints" in format_table(synchronous)  # the graph's cadence, the default
    assert "the mean of the newest 4 chunks covering it, weighted exp(-0.7 i)" in format_table(synchronous)
    alone = EvalReport(**{**report.__dict__, "config": asdict(EvalConfig(ensemble_chunks=1))})
    assert "mean of the newest" not in format_table(alone)
