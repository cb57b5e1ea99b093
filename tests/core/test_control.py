"""Spec of the control path without ROS: validation, interpolation, blending, limits, holds.

Time is driven explicitly (``now_s``), so nothing here sleeps or depends on the machine's speed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from m2vla_core.control import (
    ESTOPPED, HOLDING, TRACKING, Chunk, ChunkEnsemble, ChunkStreamer, ChunkTrajectory, ControllerConfig, JointLimits,
    PeriodMonitor, TickGrid, WorkspaceBox, check_chunk_order, check_chunk_timing, check_chunk_values, check_joint_positions,
    get_preset, limit_step, reason_code,
)
from m2vla_core.control.timing import GRAPH_LATENCY_BUDGET_S, chunk_hold_s, rate_without_holds_hz

RATE_HZ = 250.0
T = 1.0 / RATE_HZ
LIMITS = JointLimits(lower=(-2.0, -2.0), upper=(2.0, 2.0), velocity=(1.0, 1.0), acceleration=(10.0, 10.0))
LOOSE = JointLimits(lower=(-50.0, -50.0), upper=(50.0, 50.0), velocity=(1e4, 1e4), acceleration=(1e7, 1e7))


def make_config(limits: JointLimits = LIMITS, **overrides) -> ControllerConfig:
    base = dict(joint_names=("a", "b"), limits=limits, command_rate_hz=RATE_HZ, interpolation="linear",
                blend_s=0.1, max_chunk_age_s=1.0, chunk_timeout_s=0.5, max_joint_state_age_s=0.25,
                max_chunk_speed_factor=100.0)
    base.update(overrides)
    return ControllerConfig(**base)


def ramp_chunk(start, velocity, *, horizon=20, dt=0.05, observation_s=0.0, sequence_id=1) -> Chunk:
    """Waypoint i at observation + (i+1) dt lies on the line start + velocity * (i+1) dt."""
    times = (np.arange(horizon) + 1) * dt  # (H,)
    values = np.asarray(start, float)[None, :] + times[:, None] * np.asarray(velocity, float)[None, :]  # (H, A)
    return Chunk(values, dt, observation_s, sequence_id)


class Rig:
    """A streamer fed by a perfect arm: the measured state is the last command (or what
    ``run``'s ``report`` makes of it: an arm that lags or is stuck)."""

    def __init__(self, config: ControllerConfig, q0=(0.0, 0.0), fk=None) -> None:
        self.s = ChunkStreamer(config, fk)
        self.t = 0.0
        self.q = np.asarray(q0, float)
        self.s.update_joint_state(self.q, self.t)
        self.commands: list[np.ndarray] = []
        self.last = None

    def run(self, seconds: float, *, feed_joint_state: bool = True, report=None):
        out = []
        for _ in range(int(round(seconds * RATE_HZ))):
            self.t += T
            if feed_joint_state:
                self.s.update_joint_state(self.q if report is None else report(self.q), self.t)
            cmd = self.s.step(self.t)
            if cmd.position is not None:
                self.q = cmd.position.copy()
                self.commands.append(cmd.position.copy())
            out.append(cmd)
            self.last = cmd
        return out


def max_step(commands) -> float:
    arr = np.asarray(commands)  # (N, A)
    return float(np.abs(np.diff(arr, axis=0)).max()) if len(arr) > 1 else 0.0


# ----------------------------------------------------------------------------- config
def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="command_rate_hz"):
        make_config(command_rate_hz=0.0)
    with pytest.raises(ValueError, match="interpolation"):
        make_config(interpolation="quintic")
    with pytest.raises(ValueError, match="lower must be < upper"):
        JointLimits(lower=(1.0,), upper=(0.0,), velocity=(1.0,), acceleration=(1.0,))
    with pytest.raises(ValueError, match="velocity"):
        JointLimits(lower=(0.0,), upper=(1.0,), velocity=(-1.0,), acceleration=(1.0,))
    with pytest.raises(ValueError, match="limits cover 2 joints"):
        make_config(joint_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="WorkspaceBox"):
        WorkspaceBox((0.0, 0.0, 1.0), (1.0, 1.0, 0.5))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="ensemble_chunks"):
            make_config(ensemble_chunks=bad)
    for bad in (-0.1, float("nan"), 11.0, True):
        with pytest.raises(ValueError, match="ensemble_decay"):
            make_config(ensemble_decay=bad)


def test_presets_are_strict_with_a_did_you_mean():
    cfg = get_preset("panda")
    assert cfg.joint_names[-1] == "gripper_opening" and cfg.command_rate_hz == 250.0
    with pytest.raises(KeyError, match="did you mean 'panda'"):
        get_preset("pand")


# ----------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_trajectory_passes_through_waypoints_at_their_due_times_and_never_runs_past_the_end(interpolation):
    values = np.array([[0.0], [1.0], [4.0], [9.0], [16.0]])  # (H=5, A=1)
    traj = ChunkTrajectory(values, 0.1, t0_s=10.0, interpolation=interpolation)
    for i in range(5):
        assert traj.at(10.0 + (i + 1) * 0.1)[0] == pytest.approx(values[i, 0])
    # from the observation (t0) to waypoint 0 the chunk moves with its first segment's velocity
    assert traj.at(10.0)[0] == pytest.approx(-1.0) and traj.at(10.05)[0] == pytest.approx(-0.5)
    assert traj.at(9.0)[0] == pytest.approx(-1.0)  # never further back than the observation
    assert traj.at(20.0)[0] == 16.0  # after the last: the last
    assert 1.0 < traj.at(10.25)[0] < 4.0


# ----------------------------------------------------------------------------- streaming
def test_without_a_joint_state_nothing_is_commanded_and_the_reason_says_so():
    s = ChunkStreamer(make_config())
    cmd = s.step(0.0)
    assert cmd.position is None and cmd.hold_reason == "no_joint_state"


def test_before_any_chunk_it_holds_the_measured_state():
    rig = Rig(make_config(), q0=(0.3, -0.2))
    cmds = rig.run(0.1)
    assert all(c.state == HOLDING and c.hold_reason == "no_chunk" for c in cmds)
    np.testing.assert_array_equal(rig.commands[-1], [0.3, -0.2])


def test_a_chunk_moves_the_commands_to_its_final_waypoint():
    rig = Rig(make_config(chunk_timeout_s=2.0))
    chunk = ramp_chunk([0.0, 0.0], [0.5, -0.25], horizon=8, dt=0.05, observation_s=rig.t)  # ends at 0.4 s
    assert rig.s.offer_chunk(chunk, rig.t) is None
    cmds = rig.run(0.3)
    assert cmds[0].state == TRACKING
    rig.run(1.0)
    # the chunk stops abruptly at 0.5 rad/s: braking at 10 rad/s^2 overshoots by at most v^2 / 2a
    assert np.asarray(rig.commands)[:, 0].max() <= 0.2 + 0.5**2 / (2 * 10.0) + 1e-9
    np.testing.assert_allclose(rig.commands[-1], chunk.values[-1], atol=1e-6)
    assert rig.last.hold_reason == "chunk_finished"


def test_latency_is_paid_in_waypoints_already_due_not_guessed():
    rig = Rig(make_config(LOOSE, blend_s=0.0))
    chunk = ramp_chunk([0.0, 0.0], [1.0, 1.0], horizon=40, dt=0.02, observation_s=rig.t - 0.3)  # 300 ms old
    assert rig.s.offer_chunk(chunk, rig.t) is None
    rig.run(T)
    # the chunk is evaluated at the time since its observation: 0.3 s + one period along the ramp
    np.testing.assert_allclose(rig.commands[-1], [0.3 + T, 0.3 + T], atol=1e-9)
    assert rig.s.stats["waypoints_skipped"] == 14


def _blend_seam(blend_s: float) -> tuple[float, float]:
    """Chunk A in flight, then chunk B offset by 0.2 rad: (largest step at the seam, typical step)."""
    rig = Rig(make_config(LOOSE, blend_s=blend_s))
    rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=40, dt=0.05, observation_s=rig.t), rig.t)
    rig.run(0.5)
    typical = max_step(rig.commands[-20:])
    n_before = len(rig.commands)
    b = ramp_chunk(rig.commands[-1] + 0.2, [0.5, 0.5], horizon=40, dt=0.05, observation_s=rig.t, sequence_id=2)
    assert rig.s.offer_chunk(b, rig.t) is None
    rig.run(0.3)
    seam = max_step(rig.commands[n_before - 1:])
    np.testing.assert_allclose(rig.commands[-1], b.values[0] + 0.5 * 0.3 - 0.5 * 0.05, atol=1e-6)
    return seam, typical


def test_a_new_chunk_blends_in_without_a_position_jump():
    seam, typical = _blend_seam(blend_s=0.1)
    # limits are loose here, so only the blend prevents the jump: the worst step at the seam stays
    # within the normal motion plus the smoothstep's steepest slope (1.5 * offset / blend window)
    assert seam <= 2 * typical + 1.5 * 0.2 / (0.1 * RATE_HZ)
    jump, _ = _blend_seam(blend_s=0.0)
    assert jump > 0.19  # the same switch without blending jumps by the whole offset


def test_an_ensemble_is_the_mean_of_the_chunks_still_covering_the_instant():
    old = ChunkTrajectory(np.zeros((4, 2)), 0.1, 0.0, "linear")  # covers up to 0.4 s
    new = ChunkTrajectory(np.ones((4, 2)), 0.1, 0.2, "linear")  # covers up to 0.6 s
    ensemble = ChunkEnsemble([old, new])
    np.testing.assert_allclose(ensemble.at(0.3), [0.5, 0.5])
    np.testing.assert_allclose(ensemble.at(0.5), [1.0, 1.0])  # the old chunk has run out
    np.testing.assert_allclose(ensemble.at(0.9), [1.0, 1.0])  # none covers: the newest's last waypoint
    with pytest.raises(ValueError):
        ChunkEnsemble([])


def test_with_a_decay_the_older_chunks_weigh_more_as_in_act():
    old = ChunkTrajectory(np.zeros((4, 2)), 0.1, 0.0, "linear")
    new = ChunkTrajectory(np.ones((4, 2)), 0.1, 0.2, "linear")
    w = np.exp(-0.7)  # the newer one's weight; the oldest covering the instant has 1
    np.testing.assert_allclose(ChunkEnsemble([old, new], decay=0.7).at(0.3), [w / (1 + w)] * 2)
    np.testing.assert_allclose(ChunkEnsemble([old, new], decay=0.7).at(0.5), [1.0, 1.0])  # the newer alone covers
    np.testing.assert_allclose(ChunkEnsemble([old, new], decay=0.0).at(0.3), [0.5, 0.5])  # 0: equal weights


def test_with_ensemble_chunks_the_stream_follows_the_mean_of_the_newest_chunks_after_the_cross_fade():
    for n, expected in ((1, 0.2), (2, 0.1), (3, 0.1)):  # 3 keeps only the two chunks there are
        rig = Rig(make_config(LOOSE, ensemble_chunks=n, chunk_timeout_s=2.0))
        a = Chunk(np.zeros((40, 2)), 0.05, rig.t, 1)
        assert rig.s.offer_chunk(a, rig.t) is None
        rig.run(0.2)
        b = Chunk(np.full((40, 2), 0.2), 0.05, rig.t, 2)
        assert rig.s.offer_chunk(b, rig.t) is None
        rig.run(0.2)  # past the 0.1 s cross-fade
        np.testing.assert_allclose(rig.commands[-1], [expected, expected], atol=1e-9, err_msg=f"N = {n}")
        assert max_step(rig.commands) < 0.2 / 2  # joining the ensemble cross-fades too: no jump
    rig = Rig(make_config(LOOSE, ensemble_chunks=2, ensemble_decay=0.7, chunk_timeout_s=2.0))
    assert rig.s.offer_chunk(Chunk(np.zeros((40, 2)), 0.05, rig.t, 1), rig.t) is None
    rig.run(0.2)
    assert rig.s.offer_chunk(Chunk(np.full((40, 2), 0.2), 0.05, rig.t, 2), rig.t) is None
    rig.run(0.2)  # weighted toward the older plan
    w = np.exp(-0.7)
    np.testing.assert_allclose(rig.commands[-1], [0.2 * w / (1 + w)] * 2, atol=1e-9)
    rig.s.stop(rig.t)  # a drop empties the ensemble: the next chunk is followed alone
    c = Chunk(np.full((40, 2), -0.3), 0.05, rig.t + T, 3)
    rig.t += T
    assert rig.s.offer_chunk(c, rig.t) is None
    rig.run(0.3)
    np.testing.assert_allclose(rig.commands[-1], [-0.3, -0.3], atol=1e-9)


def test_estop_holds_the_last_command_on_the_next_period_and_refuses_chunks():
    rig = Rig(make_config())
    rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=40, dt=0.05, observation_s=rig.t), rig.t)
    rig.run(0.3)
    moving = rig.commands[-1].copy()
    assert max_step(rig.commands[-5:]) > 0
    rig.s.set_estop(True, rig.t)
    held = rig.run(0.2)
    assert all(c.state == ESTOPPED and c.hold_reason == "estop" for c in held)
    np.testing.assert_array_equal(np.asarray(rig.commands[-len(held):]), np.tile(moving, (len(held), 1)))
    reason = rig.s.offer_chunk(ramp_chunk(moving, [0.5, 0.5], observation_s=rig.t, sequence_id=5), rig.t)
    assert reason_code(reason) == "estop"
    # release: still holding until a chunk computed after the e-stop arrives
    rig.s.set_estop(False, rig.t)
    assert rig.run(0.05)[-1].hold_reason == "no_chunk"
    old = ramp_chunk(moving, [0.5, 0.5], observation_s=rig.t - 0.3, sequence_id=6)
    assert reason_code(rig.s.offer_chunk(old, rig.t)) == "predates_hold"
    assert rig.s.offer_chunk(ramp_chunk(moving, [0.5, 0.5], observation_s=rig.t, sequence_id=7), rig.t) is None
    assert rig.run(0.05)[-1].state == TRACKING


def test_holds_when_chunks_stop_coming():
    rig = Rig(make_config(chunk_timeout_s=0.2))
    assert rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=60, dt=0.05, observation_s=rig.t),
                             rig.t) is None
    cmds = rig.run(0.4)
    stale = [i for i, c in enumerate(cmds) if c.hold_reason == "stale_chunk"]
    assert stale and all(cmds[i].hold_reason == "stale_chunk" for i in range(stale[0], len(cmds)))
    np.testing.assert_array_equal(rig.commands[-1], rig.commands[stale[0] - 1])  # held where it was


def test_a_chunk_of_a_new_instruction_is_followed_alone_not_averaged_with_the_old_instructions_plans():
    rig = Rig(make_config(LOOSE, ensemble_chunks=4, chunk_timeout_s=2.0))
    assert rig.s.offer_chunk(Chunk(np.zeros((40, 2)), 0.05, rig.t, 1, instruction_id=7), rig.t) is None
    rig.run(0.2)
    assert rig.s.offer_chunk(Chunk(np.full((40, 2), 0.2), 0.05, rig.t, 2, instruction_id=8), rig.t) is None
    rig.run(0.2)  # past the cross-fade: on the new plan, not halfway (0.1) to it
    np.testing.assert_allclose(rig.commands[-1], [0.2, 0.2], atol=1e-9)
    assert max_step(rig.commands) < 0.2 / 2  # still cross-faded: no jump
    assert rig.s.offer_chunk(Chunk(np.full((40, 2), 0.4), 0.05, rig.t, 3, instruction_id=8), rig.t) is None
    rig.run(0.2)  # the same instruction's plans are averaged again
    np.testing.assert_allclose(rig.commands[-1], [0.3, 0.3], atol=1e-9)


def test_holds_when_the_joint_state_goes_stale():
    rig = Rig(make_config(max_joint_state_age_s=0.05))
    assert rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=60, dt=0.05, observation_s=rig.t),
                             rig.t) is None
    rig.run(0.1)
    cmds = rig.run(0.2, feed_joint_state=False)
    assert cmds[-1].hold_reason == "stale_joint_state"
    assert max_step(rig.commands[-30:]) == 0.0


def test_tracking_resumes_from_the_held_position_when_joint_states_come_back():
    rig = Rig(make_config(LOOSE, max_joint_state_age_s=0.05, chunk_timeout_s=5.0))  # only the blend smooths
    assert rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=60, dt=0.05, observation_s=rig.t),
                             rig.t) is None
    rig.run(0.2)
    held = rig.run(0.5, feed_joint_state=False)  # held for 0.45 s while the chunk's time ran on
    assert held[-1].hold_reason == "stale_joint_state"
    n = len(rig.commands)
    cmds = rig.run(0.3)
    assert cmds[-1].state == TRACKING
    # the chunk is ~0.225 rad ahead by now (and moves on at 0.5 rad/s during the 0.1 s fade):
    # rejoined through the cross-fade, not in one jump
    assert max_step(rig.commands[n - 1:]) <= 0.5 * T + 1.5 * (0.23 + 0.5 * 0.1) / (0.1 * RATE_HZ)


def test_chunks_before_the_first_joint_state_are_refused():
    s = ChunkStreamer(make_config())
    assert reason_code(s.offer_chunk(ramp_chunk([0.0, 0.0], [0.1, 0.1]), 0.0)) == "no_joint_state"


def test_non_finite_chunks_are_refused_and_change_nothing():
    rig = Rig(make_config(), q0=(0.1, 0.1))
    values = np.full((5, 2), 0.2)
    values[2, 1] = np.nan
    reason = rig.s.offer_chunk(Chunk(values, 0.05, rig.t, 1), rig.t)
    assert reason_code(reason) == "non_finite"
    assert rig.run(0.05)[-1].hold_reason == "no_chunk"
    np.testing.assert_array_equal(rig.commands[-1], [0.1, 0.1])
    assert rig.s.rejections["chunk:non_finite"] == 1
    assert reason_code(rig.s.update_joint_state([np.inf, 0.0], rig.t)) == "non_finite"


def test_out_of_order_and_stale_chunks_are_refused_but_a_restarted_policy_is_accepted():
    rig = Rig(make_config())
    assert rig.s.offer_chunk(ramp_chunk([0, 0], [0.1, 0.1], observation_s=rig.t, sequence_id=10), rig.t) is None
    rig.run(0.1)
    assert reason_code(rig.s.offer_chunk(ramp_chunk([0, 0], [0.1, 0.1], observation_s=rig.t - 0.2,
                                                    sequence_id=11), rig.t)) == "out_of_order"
    assert reason_code(rig.s.offer_chunk(ramp_chunk([0, 0], [0.1, 0.1], observation_s=rig.t - 5.0,
                                                    sequence_id=12), rig.t)) == "stale_stamp"
    assert reason_code(rig.s.offer_chunk(ramp_chunk([0, 0], [0.1, 0.1], observation_s=rig.t + 1.0,
                                                    sequence_id=13), rig.t)) == "future_stamp"
    # policy restarted: ids start over, the observation is newer
    assert rig.s.offer_chunk(ramp_chunk([0, 0], [0.1, 0.1], observation_s=rig.t, sequence_id=1), rig.t) is None
    assert rig.s.stats["chunks_rejected"] == 3


def test_velocity_and_acceleration_limits_clamp_and_are_counted():
    rig = Rig(make_config(chunk_timeout_s=2.0))  # 1 rad/s, 10 rad/s^2
    fast = ramp_chunk([0.0, 0.0], [3.0, 0.0], horizon=12, dt=0.05, observation_s=rig.t)  # 3x too fast
    assert rig.s.offer_chunk(fast, rig.t) is None
    rig.run(0.6)
    v = np.diff(np.asarray(rig.commands), axis=0) / T  # (N-1, A)
    assert np.abs(v).max() <= 1.0 + 1e-9
    assert np.abs(np.diff(v, axis=0)).max() <= 10.0 * T + 1e-9
    assert rig.s.stats["velocity_clamps"] > 0 and rig.s.stats["limit_clamps"] > 0


def test_a_target_step_is_reached_without_overshoot():
    rig = Rig(make_config(chunk_timeout_s=5.0))
    step = Chunk(np.tile([[0.8, -0.5]], (40, 1)), 0.05, rig.t, 1)  # constant far target: a step
    assert rig.s.offer_chunk(step, rig.t) is None
    rig.run(1.9)
    arr = np.asarray(rig.commands)
    assert arr[:, 0].max() <= 0.8 + 1e-9 and arr[:, 1].min() >= -0.5 - 1e-9
    np.testing.assert_allclose(arr[-1], [0.8, -0.5], atol=1e-6)


def test_position_limits_hold_even_for_chunks_at_the_tolerance_edge():
    rig = Rig(make_config(position_tolerance=0.05), q0=(1.9, 0.0))
    edge = Chunk(np.tile([[2.04, 0.0]], (10, 1)), 0.05, rig.t, 1)
    assert rig.s.offer_chunk(edge, rig.t) is None
    rig.run(0.5)
    assert np.asarray(rig.commands)[:, 0].max() <= 2.0
    beyond = Chunk(np.tile([[2.2, 0.0]], (10, 1)), 0.05, rig.t, 2)
    assert reason_code(rig.s.offer_chunk(beyond, rig.t)) == "out_of_limits"


def test_workspace_box_stops_motion_out_of_it_but_allows_moving_back():
    fk = lambda q: np.array([q[0], q[1], 0.5])  # noqa: E731 - toy kinematics: x = q0, y = q1
    cfg = make_config(workspace=WorkspaceBox((-0.3, -1.0, 0.0), (0.3, 1.0, 1.0)))
    rig = Rig(cfg, fk=fk)
    rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.8, 0.0], horizon=20, dt=0.05, observation_s=rig.t), rig.t)
    rig.run(1.0)
    assert np.asarray(rig.commands)[:, 0].max() <= 0.3
    assert rig.s.stats["workspace_clamps"] > 0
    back = ramp_chunk(rig.commands[-1], [-0.5, 0.0], horizon=20, dt=0.05, observation_s=rig.t, sequence_id=2)
    assert rig.s.offer_chunk(back, rig.t) is None
    rig.run(0.5)
    assert rig.commands[-1][0] < 0.2


def test_a_joint_state_outside_the_limits_is_refused_and_never_becomes_a_command():
    s = ChunkStreamer(make_config())
    reason = s.update_joint_state([100.0, 0.0], 0.0)  # a driver's sentinel or a unit mix-up
    assert reason is not None and reason_code(reason) == "out_of_limits" and "a = 100" in reason
    assert s.step(0.0).position is None  # nothing measured yet: nothing is sent
    rig = Rig(make_config(), q0=(0.3, -0.2))
    assert rig.s.update_joint_state([0.3, 100.0], rig.t) is not None
    rig.s.reset(rig.t)  # a reset holds the measured state: the last good one
    rig.run(0.1)
    np.testing.assert_array_equal(rig.commands[-1], [0.3, -0.2])
    assert rig.s.rejections["joint_state:out_of_limits"] == 1


def test_reset_holds_the_measured_state_not_the_stale_command():
    rig = Rig(make_config())
    rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=40, dt=0.05, observation_s=rig.t), rig.t)
    rig.run(0.3)
    rig.s.update_joint_state([1.0, -1.0], rig.t)  # e.g. the sim was reset to another pose
    rig.s.reset(rig.t)
    cmd = rig.s.step(rig.t + T)
    assert cmd.hold_reason == "reset"
    np.testing.assert_array_equal(cmd.position, [1.0, -1.0])


def test_stop_drops_the_chunk_and_holds_the_command():
    rig = Rig(make_config())
    rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=40, dt=0.05, observation_s=rig.t), rig.t)
    rig.run(0.2)
    last = rig.commands[-1].copy()
    rig.s.stop(rig.t)
    assert rig.run(0.1)[-1].hold_reason == "stopped"
    np.testing.assert_array_equal(rig.commands[-1], last)


# ----------------------------------------------------------------------------- following error
def test_an_arm_that_stops_following_latches_a_hold_at_where_it_is_until_reset():
    rig = Rig(make_config(max_following_error=0.05, following_error_time_s=0.2, chunk_timeout_s=5.0))
    assert rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.0], horizon=80, dt=0.05, observation_s=rig.t),
                             rig.t) is None
    rig.run(0.1)
    blocked = rig.q.copy()  # the arm hits something here; the commands run on at 0.5 rad/s
    cmds = rig.run(0.6, report=lambda q: blocked)
    faulted = [i for i, c in enumerate(cmds) if c.hold_reason == "following_error"]
    # 0.05 rad behind after 0.1 s, then 0.2 s more: latched about 0.3 s into the block, never before 0.2 s
    assert faulted and 0.2 <= faulted[0] * T <= 0.35
    assert all(c.hold_reason == "following_error" for c in cmds[faulted[0]:])  # latched
    np.testing.assert_allclose(cmds[-1].position, blocked)  # holds where the arm is, not the last command
    assert rig.s.fault.startswith("a ") and rig.s.stats["following_error_faults"] == 1  # names the joint
    reason = rig.s.offer_chunk(ramp_chunk(blocked, [0.5, 0.0], observation_s=rig.t, sequence_id=2), rig.t)
    assert reason_code(reason) == "following_error"
    rig.s.set_estop(True, rig.t)
    rig.s.set_estop(False, rig.t)  # releasing an e-stop does not clear the fault
    assert rig.run(0.05, report=lambda q: blocked)[-1].hold_reason == "following_error"
    rig.s.reset(rig.t)
    assert not rig.s.fault
    assert rig.s.offer_chunk(ramp_chunk(blocked, [0.5, 0.0], observation_s=rig.t, sequence_id=1), rig.t) is None
    assert rig.run(0.1)[-1].state == TRACKING


def test_a_short_lag_does_not_fault_and_an_exempt_joint_is_not_watched():
    def stuck_b(exempt: tuple[str, ...]) -> Rig:
        rig = Rig(make_config(max_following_error=0.05, following_error_time_s=0.2, chunk_timeout_s=5.0,
                              following_error_exempt=exempt))
        assert rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=80, dt=0.05, observation_s=rig.t),
                                 rig.t) is None
        rig.run(0.1)
        rig.run(0.15, report=lambda q: [q[0] - 0.075, 0.0])  # "a" 0.075 behind for 0.15 s, then it catches up
        rig.run(0.6, report=lambda q: [q[0], 0.0])  # "b" stays at 0 (a gripper closed on a cube) while "a" follows
        return rig

    exempt = stuck_b(("b",))
    assert not exempt.s.fault
    assert exempt.s.following_error_peak > 0.05  # "a"'s short lag was seen, and was too short to fault
    assert stuck_b(()).s.fault.startswith("b ")  # the same run with "b" watched faults on "b"
    off = Rig(make_config(chunk_timeout_s=5.0))  # max_following_error 0: never checked
    off.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.5], horizon=80, dt=0.05, observation_s=off.t), off.t)
    assert all(c.hold_reason != "following_error" for c in off.run(1.0, report=lambda q: [0.0, 0.0]))


def test_an_error_must_last_its_full_time_after_an_unchecked_e_stop():
    rig = Rig(make_config(max_following_error=0.05, following_error_time_s=0.2, chunk_timeout_s=5.0))
    rig.s.offer_chunk(ramp_chunk([0.0, 0.0], [0.5, 0.0], horizon=80, dt=0.05, observation_s=rig.t), rig.t)
    rig.run(0.1)
    blocked = rig.q.copy()
    stuck = {"report": lambda q: blocked}
    rig.run(0.15, **stuck)  # over the limit for ~0.05 s of the 0.2 s
    rig.s.set_estop(True, rig.t)
    rig.run(0.5, **stuck)  # unchecked while e-stopped
    rig.s.set_estop(False, rig.t)
    cmds = rig.run(0.1, **stuck)  # still 0.06 rad apart, for 0.1 s < 0.2 s
    assert all(c.hold_reason != "following_error" for c in cmds)
    assert rig.run(0.15, **stuck)[-1].hold_reason == "following_error"


def test_after_a_reset_the_hold_anchors_on_a_joint_state_from_after_the_reset():
    rig = Rig(make_config(max_following_error=0.05, following_error_time_s=0.2))
    rig.s.update_joint_state([0.8, 0.0], rig.t)  # the arm before the sim moved it home
    rig.t += 0.01
    rig.s.reset(rig.t)  # the reset overtook the arm's new state
    for _ in range(3):
        rig.t += T
        np.testing.assert_array_equal(rig.s.step(rig.t).position, [0.8, 0.0])  # holds what is measured
    home = rig.run(0.5, report=lambda q: [0.0, 0.0])  # the new state arrives: held there, no fault
    assert all(c.hold_reason == "reset" for c in home) and not rig.s.fault
    np.testing.assert_array_equal(home[-1].position, [0.0, 0.0])


def test_following_error_settings_are_checked():
    with pytest.raises(ValueError, match="max_following_error"):
        make_config(max_following_error=-0.1)
    with pytest.raises(ValueError, match="following_error_exempt names \\['gripper'\\]"):
        make_config(max_following_error=0.1, following_error_exempt=("gripper",))


def test_period_monitor_reports_rate_and_period_error():
    m = PeriodMonitor(0.004)
    for k in range(251):
        m.tick(k * 0.004 + (0.002 if k == 100 else 0.0))
    summary = m.summary()
    assert summary["rate_hz"] == pytest.approx(250.0, rel=1e-6)
    assert summary["on_time_fraction"] < 1.0
    assert m.summary()["ticks"] == 0


def test_the_shipped_cadence_never_runs_a_chunk_out_but_a_slower_one_or_a_shorter_chunk_does():
    span_s = 16 * 0.1  # the shipped head: 16 waypoints, 0.1 s apart
    assert chunk_hold_s(span_s, period_s=4 * 0.1) == 0.0  # re-planned every 4 waypoints (policy.yaml)
    assert chunk_hold_s(span_s, period_s=12 * 0.1) == 0.0  # or every 12, as shipped before
    assert chunk_hold_s(span_s, period_s=1.5) == pytest.approx(1.5 + GRAPH_LATENCY_BUDGET_S - span_s)
    assert chunk_hold_s(8 * 0.1, period_s=1.2) > 0.0  # a head with half the chunk at the same rate
    assert chunk_hold_s(span_s, period_s=1.2, latency_s=0.5) > 0.0  # a slower graph
    rate_hz = rate_without_holds_hz(span_s)  # the slowest rate that never holds
    assert chunk_hold_s(span_s, period_s=1.0 / rate_hz) == pytest.approx(0.0, abs=1e-12)
    assert chunk_hold_s(span_s, period_s=1.0 / (0.99 * rate_hz)) > 0.0
    assert rate_without_holds_hz(GRAPH_LATENCY_BUDGET_S) is None  # a chunk no longer than the latency


# ----------------------------------------------------------------------------- properties
CFG3 = ControllerConfig(joint_names=("a", "b", "c"), limits=JointLimits((-1.0,) * 3, (1.0,) * 3, (2.0,) * 3,
                                                                         (20.0,) * 3))
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=150, deadline=None)
@given(values=hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), elements=floats),
       dt=st.one_of(floats, st.just(0.05)))
def test_chunk_validator_accepts_exactly_the_valid_chunks_and_never_raises(values, dt):
    reason = check_chunk_values(values, dt, CFG3)
    valid = (values.ndim == 2 and values.shape[0] >= 1 and values.shape[1] == 3 and math.isfinite(dt)
             and 1e-4 <= dt <= 10.0 and np.isfinite(values).all() and np.all(np.abs(values) <= 1.05)
             and (values.shape[0] < 2 or np.all(np.abs(np.diff(values, axis=0)) / dt <= 6.0)))
    assert (reason is None) == bool(valid), reason
    if reason is not None:
        assert reason_code(reason) in {"bad_shape", "bad_dt", "non_finite", "out_of_limits", "too_fast"}


@settings(max_examples=100, deadline=None)
@given(values=hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=2, max_side=5), elements=floats))
def test_joint_state_validator_never_raises(values):
    reason = check_joint_positions(values, CFG3)
    limit = 1.0 + CFG3.position_tolerance
    assert (reason is None) == (values.shape == (3,) and bool(np.isfinite(values).all())
                                and bool((np.abs(values) <= limit).all()))


@settings(max_examples=100, deadline=None)
@given(obs=floats, now=st.floats(-1e6, 1e6), seq=st.integers(0, 2**63), last_seq=st.one_of(st.none(), st.integers(0, 2**63)),
       last_obs=st.one_of(st.none(), st.floats(-1e6, 1e6)))
def test_timing_and_order_checks_return_a_reason_or_none(obs, now, seq, last_seq, last_obs):
    for reason in (check_chunk_timing(obs, now, CFG3),
                   check_chunk_order(seq, obs, last_sequence_id=last_seq, last_observation_s=last_obs,
                                     not_before_s=None)):
        assert reason is None or ":" in reason


vec3 = hnp.arrays(np.float64, 3, elements=st.floats(-3.0, 3.0))


@settings(max_examples=200, deadline=None)
@given(target=vec3, previous_target=vec3, previous=hnp.arrays(np.float64, 3, elements=st.floats(-1.0, 1.0)),
       previous_velocity=hnp.arrays(np.float64, 3, elements=st.floats(-2.0, 2.0)))
def test_limit_step_stays_inside_position_velocity_and_acceleration_limits(target, previous_target, previous,
                                                                          previous_velocity):
    lim = CFG3.limits
    r = limit_step(target, previous_target, previous, previous_velocity, T, lim)
    assert np.all(r.position >= -1.0) and np.all(r.position <= 1.0)
    assert np.all(np.abs(r.velocity) <= 2.0 + 1e-9)
    at_bound = np.isclose(np.abs(r.position), 1.0)
    accel_ok = np.abs(r.velocity - previous_velocity) <= 20.0 * T + 1e-9
    assert np.all(accel_ok | at_bound)


def test_the_tick_grid_ignores_wake_up_jitter_and_restarts_without_a_burst_when_far_behind():
    grid = TickGrid(T, start_s=0.0)
    wake_ups = [0.0, T + 0.3 * T, 2 * T, 3 * T + 0.9 * T, 4 * T]  # late, on time, late, on time
    assert [grid.tick(t) for t in wake_ups] == pytest.approx([0.0, T, 2 * T, 3 * T, 4 * T])
    assert grid.tick(5 * T + 10 * T) == pytest.approx(15 * T)  # stalled 10 periods: one step at the wake-up...
    assert grid.tick(16 * T) == pytest.approx(16 * T)  # ...then on the new grid, no catch-up burst

