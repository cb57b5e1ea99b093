"""Scripted experts: every task's expert solves fixed seeds; actions are valid joint targets."""

from __future__ import annotations

import numpy as np
import pytest

from m2vla_core.sim import ExpertConfig, SimConfig, TaskEnv, make_expert, run_expert_episode, task_names
from m2vla_core.sim.experts import drive_expert, hand_yaw, holds_cube

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def env():
    with TaskEnv(SimConfig(render=False)) as e:
        yield e


@pytest.mark.parametrize("task", task_names())
def test_expert_succeeds_on_fixed_seeds(env, task):
    for seed in SEEDS:
        success, steps = run_expert_episode(env, task, seed)
        assert success, f"{task} seed {seed}: expert failed after {steps} steps"
        assert steps < ExpertConfig().max_steps


def test_expert_actions_are_joint_targets_inside_the_urdf_limits(env):
    obs = env.reset("put_in_tray", 4)
    expert = make_expert(env)
    actions = []
    while not expert.done:
        action = expert.act(obs)
        actions.append(action)
        obs = env.step(action)
    actions = np.array(actions)  # (T, 8)
    assert actions.shape[1] == 8 and np.isfinite(actions).all()
    assert (actions >= env.joint_lower - 1e-6).all() and (actions <= env.joint_upper + 1e-6).all()
    assert actions[:, 7].min() == pytest.approx(0.0) and actions[:, 7].max() == pytest.approx(0.08)


def test_noisy_expert_run_is_reproducible_for_a_seed(env):
    def trace(seed):
        seen = []
        run_expert_episode(env, "pick_lift", seed, ExpertConfig(noise_std_rad=0.02),
                           on_step=lambda o, a, x: seen.append(o.joint_positions.copy()))
        return np.array(seen)

    a, b = trace(5), trace(5)
    clean = []
    run_expert_episode(env, "pick_lift", 5, on_step=lambda o, a_, x: clean.append(o.joint_positions.copy()))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[: len(clean)], np.array(clean)[: len(a)])


def test_another_noise_stream_perturbs_the_same_layout_differently(env):
    def trace(stream):
        seen = []
        run_expert_episode(env, "pick_lift", 5, ExpertConfig(noise_std_rad=0.02, noise_stream=stream),
                           on_step=lambda o, a, x: seen.append(o.joint_positions.copy()))
        return np.array(seen)

    first, again, other = trace(0), trace(0), trace(1)
    assert np.array_equal(first, again)
    assert np.array_equal(first[0], other[0])  # same layout, same start
    assert not np.array_equal(first[: len(other)], other[: len(first)])


def test_noise_config_out_of_range_is_refused():
    with pytest.raises(ValueError, match="noise_std_rad"):
        ExpertConfig(noise_std_rad=-0.1)
    with pytest.raises(ValueError, match="noise_stream"):
        ExpertConfig(noise_stream=-1)


def test_expert_needs_a_reset_env():
    with TaskEnv(SimConfig(render=False)) as fresh:
        with pytest.raises(RuntimeError, match="reset"):
            make_expert(fresh)


def test_expert_agent_drives_the_evaluation_rollout_to_success_through_the_controllers_checks(env):
    from m2vla_core.control.config import get_preset
    from m2vla_core.evaluation.rollout import RolloutConfig, run_episode
    from m2vla_core.sim import ExpertAgent

    rollout = RolloutConfig(max_steps=150, execute_steps=1, controller=get_preset("panda"))
    outcome = run_episode(env, ExpertAgent(env), "put_in_tray", 7, rollout)
    assert outcome.success and outcome.steps < 150
    assert outcome.refusals == []  # what the demonstrations command, the ROS controller accepts


def test_a_chunk_the_controller_would_refuse_is_held_not_clipped_into_range(env):
    """The sim clips a target into the URDF limits; the ROS controller refuses the whole chunk
    (beyond its tolerance) and holds. Evaluation does what the robot would."""
    from m2vla_core.control.config import get_preset
    from m2vla_core.evaluation.rollout import RolloutConfig, run_episode

    class ClosesTooFar:  # a head that learnt "closed" as an offset and overshoots below zero
        def reset(self) -> None:
            pass

        def act(self, observation) -> np.ndarray:
            target = np.asarray(observation.joint_positions, dtype=np.float64).copy()
            target[0] += 0.05  # and turns the base a little
            target[7] = -0.06
            return np.repeat(target[None], 16, axis=0)

    home = env.reset("pick_lift", 3).joint_positions.copy()
    every4 = dict(max_steps=8, execute_steps=4)  # two chunks
    held = run_episode(env, ClosesTooFar(), "pick_lift", 3, RolloutConfig(**every4, controller=get_preset("panda")))
    assert held.refusals == ["out_of_limits", "out_of_limits"]
    np.testing.assert_allclose(env.observe().joint_positions, home, atol=2e-3)  # the arm did not move
    clipped = run_episode(env, ClosesTooFar(), "pick_lift", 3, RolloutConfig(**every4))
    assert clipped.refusals == []
    moved = env.observe().joint_positions
    assert moved[0] > home[0] + 0.05 and moved[7] < home[7] - 0.02  # executed, the gripper clipped to closed


def _drive(env, task, seed, steps):
    """The expert drives ``steps`` control steps of a fresh episode; returns the observation."""
    obs = env.reset(task, seed)
    expert = make_expert(env)
    for _ in range(steps):
        obs = env.step(expert.act(obs))
    return obs


@pytest.mark.parametrize("task", ["push_to_zone", "place_on_zone", "stack"])
def test_an_expert_resumed_mid_episode_plans_from_there_and_still_succeeds(env, task):
    for steps in (15, 45):
        obs = _drive(env, task, 0, steps)
        success, _ = drive_expert(env, obs, make_expert(env, resume=True), 0)
        assert success, f"{task}: the expert resumed after {steps} steps failed"


def test_a_resumed_expert_carries_a_held_cube_on_instead_of_picking_it_again(env):
    obs = _drive(env, "stack", 0, 45)
    assert holds_cube(env, env.spec.cube)
    expert = make_expert(env, resume=True)
    assert [w.name for w in expert.waypoints][:2] == ["realign", "lower"]
    openings = []
    while expert.waypoints[expert._index].name in ("realign", "lower"):
        action = expert.act(obs)
        openings.append(action[7])
        obs = env.step(action)
    assert max(openings) == 0.0  # the fingers stay shut until the release
    assert holds_cube(env, env.spec.cube)


def test_a_cube_on_the_table_is_not_held_and_a_resumed_plan_picks_it(env):
    _drive(env, "stack", 0, 5)
    assert not holds_cube(env, env.spec.cube)
    assert make_expert(env, resume=True).waypoints[0].name == "above cube"


def test_the_hand_yaw_is_read_back_from_its_pose(env):
    obs = _drive(env, "pick_lift", 3, 0)
    expert = make_expert(env)
    target = expert.waypoints[0].yaw
    assert abs(target) > 0.1  # a layout whose grasp turns the hand
    for _ in range(30):
        obs = env.step(expert.act(obs))
    assert hand_yaw(env) == pytest.approx(target, abs=0.03)
