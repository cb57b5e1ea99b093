"""Task suite: strict registry, deterministic seeded episodes, strict success checks."""

from __future__ import annotations

import numpy as np
import pytest

from m2vla_core.sim import SimConfig, TaskEnv, get_task, make_expert, task_names
from m2vla_core.sim.scene import CUBE_SIZE_M, TRAY_SIZE_M, ZONE_SIZE_M

HALF = CUBE_SIZE_M / 2


@pytest.fixture(scope="module")
def env():
    with TaskEnv(SimConfig(render=False)) as e:
        yield e


@pytest.fixture(scope="module")
def small_render_env():
    with TaskEnv(SimConfig(image_width=32, image_height=32)) as e:
        yield e


def _settle(env, seconds=0.3):
    env.step_physics(seconds)


def _run_expert(env, task, seed):
    obs = env.reset(task, seed)
    expert = make_expert(env)
    while not expert.done:
        obs = env.step(expert.act(obs))
    return obs


def test_suite_has_at_least_six_language_conditioned_tasks():
    names = task_names()
    assert len(names) >= 6
    assert {"reach_above", "push_to_zone", "pick_lift", "place_on_zone", "stack", "put_in_tray"} <= set(names)


def test_unknown_task_name_raises_with_did_you_mean():
    with pytest.raises(KeyError, match="did you mean 'stack'"):
        get_task("stak")


def test_instruction_names_the_cube_and_the_target_by_colour():
    for seed in range(5):
        spec = get_task("put_in_tray").make_episode(seed)
        assert f"{spec.cube} " in spec.instruction and f"{spec.target} tray" in spec.instruction
        assert spec.target_kind == "tray"
        spec = get_task("stack").make_episode(seed)
        assert spec.cube != spec.target and spec.target in spec.instruction


def test_named_objects_xy_are_the_named_cube_then_its_target_or_the_cube_again(env):
    reach = get_task("reach_above").make_episode(4)
    cube = reach.layout.cube(reach.cube).xy_m
    np.testing.assert_array_equal(reach.named_objects_xy(), [*cube, *cube])
    stack = get_task("stack").make_episode(4)
    np.testing.assert_array_equal(stack.named_objects_xy()[2:], stack.layout.cube(stack.target).xy_m)
    tray = get_task("put_in_tray").make_episode(4)
    np.testing.assert_array_equal(tray.named_objects_xy()[2:], tray.layout.target("tray", tray.target).xy_m)
    assert not np.allclose(tray.named_objects_xy()[:2], tray.named_objects_xy()[2:])
    obs = env.reset("put_in_tray", 4)  # the simulator reports the same truth with every observation
    np.testing.assert_array_equal(obs.named_objects_xy, tray.named_objects_xy())


def test_instruction_phrasings_and_layouts_vary_with_the_seed():
    specs = [get_task("place_on_zone").make_episode(s) for s in range(12)]
    assert len({s.instruction.replace(s.cube, "X").replace(s.target, "Y") for s in specs}) >= 2
    assert len({s.layout.cubes[0].xy_m for s in specs}) == 12


def test_every_scene_has_three_cubes_two_zones_and_a_tray_without_overlap():
    for task in task_names():
        layout = get_task(task).make_episode(3).layout
        assert len(layout.cubes) == 3 and len({c.colour for c in layout.cubes}) == 3
        assert [t.kind for t in layout.targets] == ["zone", "zone", "tray"]
        xy = [c.xy_m for c in layout.cubes]
        for i in range(3):
            for j in range(i + 1, 3):
                assert np.hypot(xy[i][0] - xy[j][0], xy[i][1] - xy[j][1]) >= 0.08


def test_reset_is_bit_identical_for_a_seed_and_differs_between_seeds(small_render_env):
    env = small_render_env

    def rollout(seed):
        obs = env.reset("pick_lift", seed)
        out = [obs.image, obs.joint_positions, obs.ee_pose]
        for _ in range(3):
            obs = env.step(env.home_action + 0.05)
            out += [obs.image, obs.joint_positions, obs.ee_pose]
        return out

    first = rollout(11)
    rollout(12)  # another episode in between must not leak into the next one
    again = rollout(11)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (32, 32, 3) and first[0].dtype == np.uint8
    other = env.reset("pick_lift", 12)
    assert not np.array_equal(first[0], other.image)


def test_action_of_wrong_shape_or_non_finite_is_refused(env):
    env.reset("reach_above", 0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(7))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full(8, np.nan))


def test_joint_limits_come_from_the_urdf(env):
    assert env.joint_lower.shape == (8,) and env.joint_upper.shape == (8,)
    assert env.joint_upper[3] == pytest.approx(0.0) and env.joint_lower[3] == pytest.approx(-3.1416, abs=1e-3)
    assert env.joint_upper[7] == pytest.approx(0.08)  # gripper opening = 2 x finger limit
    assert len(env.joint_names) == 9


def test_low_level_command_and_physics_step_move_the_arm(env):
    env.reset("reach_above", 0)
    q = env.home_action
    q[0] += 0.2
    env.apply_joint_command(q)
    assert env.step_physics(0.5) == 120
    assert env.observe().joint_positions[0] == pytest.approx(q[0], abs=0.02)
    assert env.time_s == pytest.approx(0.5)


# ------------------------------------------------------------------ success checks reject near misses
def test_push_success_needs_the_cube_inside_the_zone(env):
    env.reset("push_to_zone", 0)
    spec = env.spec
    zx, zy = spec.layout.target("zone", spec.target).xy_m
    env.scene.set_cube_pose(spec.cube, (zx, zy, HALF))
    _settle(env)
    assert env.success()
    env.scene.set_cube_pose(spec.cube, (zx + ZONE_SIZE_M / 2 + 0.005, zy, HALF))  # just past the edge
    _settle(env)
    assert not env.success()


def test_push_is_failed_by_a_cube_that_was_lifted(env):
    env.reset("push_to_zone", 1)
    spec = env.spec
    zx, zy = spec.layout.target("zone", spec.target).xy_m
    env.scene.set_cube_pose(spec.cube, (zx, zy, 0.12))
    env.step_physics(0.02)
    env.scene.set_cube_pose(spec.cube, (zx, zy, HALF))
    _settle(env)
    assert not env.success()


def test_place_on_zone_needs_a_carried_cube_inside_the_zone(env):
    env.reset("place_on_zone", 2)
    spec = env.spec
    zx, zy = spec.layout.target("zone", spec.target).xy_m
    env.scene.set_cube_pose(spec.cube, (zx, zy, HALF))
    _settle(env)
    assert not env.success()  # slid there, never carried
    env.scene.set_cube_pose(spec.cube, (zx, zy, 0.12))
    env.step_physics(0.02)
    env.scene.set_cube_pose(spec.cube, (zx, zy + ZONE_SIZE_M / 2 - 0.02, HALF))
    _settle(env)
    assert env.success()
    env.scene.set_cube_pose(spec.cube, (zx, zy + ZONE_SIZE_M / 2 - 0.002, HALF))  # 8 mm beyond the tolerance
    _settle(env)
    assert not env.success()


def test_tray_success_needs_the_cube_resting_inside_the_walls(env):
    env.reset("put_in_tray", 0)
    spec = env.spec
    tx, ty = spec.layout.target("tray", spec.target).xy_m
    env.scene.set_cube_pose(spec.cube, (tx, ty, 0.03))
    _settle(env)
    assert env.success()
    env.scene.set_cube_pose(spec.cube, (tx, ty, 0.09))  # hovering above the tray is not "in" it
    assert not env.success()
    env.scene.set_cube_pose(spec.cube, (tx + TRAY_SIZE_M / 2 + HALF + 0.005, ty, HALF))  # just outside the wall
    _settle(env)
    assert not env.success()


def test_stack_success_needs_the_cube_centred_on_the_base(env):
    env.reset("stack", 0)
    spec = env.spec
    base, _ = env.scene.cube_pose(spec.target)
    env.scene.set_cube_pose(spec.target, (base[0], base[1], HALF))
    env.scene.set_cube_pose(spec.cube, (base[0], base[1], CUBE_SIZE_M + HALF + 0.001))
    _settle(env)
    assert env.success()
    env.scene.set_cube_pose(spec.cube, (base[0] + 0.025, base[1], CUBE_SIZE_M + HALF))  # overhanging
    assert not env.success()
    env.scene.set_cube_pose(spec.cube, (base[0] + 0.12, base[1], HALF))  # beside it on the table
    _settle(env)
    assert not env.success()


def test_reach_success_rejects_a_gripper_two_and_a_half_cm_off(env):
    _run_expert(env, "reach_above", 0)
    assert env.success()
    pos, _ = env.scene.cube_pose(env.spec.cube)
    env.scene.set_cube_pose(env.spec.cube, (pos[0] + 0.025, pos[1], pos[2]))
    assert not env.success()


def test_lift_success_needs_the_cube_held_not_just_high(env):
    _run_expert(env, "pick_lift", 0)
    assert env.success()
    env.reset("pick_lift", 0)
    pos, _ = env.scene.cube_pose(env.spec.cube)
    env.scene.set_cube_pose(env.spec.cube, (pos[0], pos[1], 0.15))  # floating, not in the fingers
    assert not env.success()
