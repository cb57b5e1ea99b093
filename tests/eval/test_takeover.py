"""Takeover episodes: a policy drives, the expert finishes from the state it left, and only the
expert's part is recorded. The scripted expert stands in for the policy here (it is an Agent
too); `m2vla record --policy` with a trained head is in test_pipeline.py."""

from __future__ import annotations

import numpy as np
import pytest

from m2vla_core.evaluation.takeover import TakeoverConfig, record_takeover_episode
from m2vla_core.sim import ExpertConfig, SimConfig, TaskEnv
from m2vla_core.sim.experts import ExpertAgent


@pytest.fixture(scope="module")
def env():
    with TaskEnv(SimConfig(image_width=48, image_height=48)) as e:
        yield e


def test_the_episode_starts_where_the_policy_left_the_arm_and_ends_in_success(env):
    config = TakeoverConfig(min_steps=8, max_steps=8)
    result = record_takeover_episode(env, ExpertAgent(env), "place_on_zone", 2, ExpertConfig(), config)
    assert result.takeover_step == 8 and not result.policy_success
    # the same 8 steps again: the recorded episode's first state is the arm after them
    obs = env.reset("place_on_zone", 2)
    agent = ExpertAgent(env)
    agent.reset()
    for _ in range(8):
        obs = env.step(agent.act(obs)[0])
    episode = result.episode
    assert np.allclose(episode.states[0], obs.joint_positions, atol=1e-5)
    assert not np.allclose(episode.states[0], env.home_action, atol=1e-3)
    assert episode.success and episode.seed == 2 and episode.task == "place_on_zone"
    assert episode.timestamps[0] == 0.0 and np.all(np.diff(episode.timestamps) > 0)
    assert len(episode.frames) == len(episode.states) == len(episode.actions)


class _BeyondJointLimits:
    """A policy whose every chunk sends joint 1 far past its limit."""

    def reset(self):
        pass

    def act(self, observation):
        chunk = np.tile(np.asarray(observation.joint_positions, dtype=np.float64), (16, 1))  # (H, A)
        chunk[:, 0] = 10.0  # [rad]; the Panda's joint 1 stops at 2.9
        return chunk


def test_the_policy_drives_through_the_controllers_checks_so_a_refused_chunk_holds_the_arm(env):
    # without the checks the simulator would clip the target and swing joint 1 to its limit
    result = record_takeover_episode(env, _BeyondJointLimits(), "reach_above", 0, ExpertConfig(),
                                     TakeoverConfig(min_steps=8, max_steps=8))
    assert result.takeover_step == 8
    assert np.allclose(result.episode.states[0], env.home_action, atol=1e-3)


def test_a_policy_that_finishes_before_its_takeover_gives_no_episode(env):
    config = TakeoverConfig(min_steps=150, max_steps=150)
    result = record_takeover_episode(env, ExpertAgent(env), "reach_above", 0, ExpertConfig(), config)
    assert result.policy_success and result.episode is None and result.takeover_step < 150


def test_the_takeover_step_is_drawn_per_layout_reproducibly_inside_its_range():
    config = TakeoverConfig(min_steps=10, max_steps=70)
    steps = [config.steps_for(seed) for seed in range(200)]
    assert steps == [config.steps_for(seed) for seed in range(200)]
    assert min(steps) >= 10 and max(steps) <= 70 and len(set(steps)) > 30
    assert config.steps_for(3, stream=1) != config.steps_for(3) or config.steps_for(4, stream=1) != config.steps_for(4)


@pytest.mark.parametrize("low, high", [(0, 5), (9, 3)])
def test_a_range_that_is_empty_or_starts_below_one_step_is_refused(low, high):
    with pytest.raises(ValueError, match="min_steps"):
        TakeoverConfig(min_steps=low, max_steps=high)
