"""A head that reads the named objects' positions gets them from the camera, never from a guess.

Such a head (trained with ``m2vla features --privileged-state``) loads only with its object
localiser; perception reads the positions with it once per instruction and sends them with
the features; the policy refuses to act without finite ones.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from safety_support import build_random_policy
from visualization_msgs.msg import MarkerArray

from m2vla_core.perception import PerceptionConfig, PerceptionEngine
from m2vla_core.policy_engine import DEFAULT_STATE_NAMES, INVALID_CHECKPOINT, PolicyEngine, PolicyLoadError
from m2vla_msgs.msg import LayerFeatures
from m2vla_msgs.srv import LoadPolicy
from m2vla_ros import qos
from m2vla_ros.conversions import contract_to_msg

XY = np.array([0.55, 0.10, 0.45, -0.15], dtype=np.float32)  # cube x, y, target x, y [m]


@pytest.fixture(scope="module")
def positions_policy(tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("positions") / "head", object_positions=True)


def test_such_a_head_loads_only_with_its_localiser_and_announces_it_in_its_contract(positions_policy, tmp_path):
    blind = build_random_policy(tmp_path / "blind", export=False, object_positions=True, localiser=False)
    engine = PolicyEngine()
    with pytest.raises(PolicyLoadError, match="no object localiser") as refused:
        engine.load(blind, backend="torch")
    assert refused.value.code == INVALID_CHECKPOINT and not engine.loaded
    engine.load(positions_policy)
    assert engine.localiser_dir == str(positions_policy.resolve()) and engine.reads_object_positions
    assert engine.state_joint_names == DEFAULT_STATE_NAMES  # what /joint_states supplies; the rest is perception's
    assert contract_to_msg(engine).localiser == str(positions_policy.resolve())
    (positions_policy / "localiser.safetensors").rename(tmp_path / "moved")  # half a localiser: refused
    try:
        with pytest.raises(PolicyLoadError, match="localiser.safetensors"):
            PolicyEngine().load(positions_policy)
    finally:
        (tmp_path / "moved").rename(positions_policy / "localiser.safetensors")


def test_without_finite_positions_it_holds_and_with_them_it_acts_on_joints_plus_positions(positions_policy):
    from m2vla_core.export.runtime import HeadPolicy

    engine = PolicyEngine()
    engine.load(positions_policy)
    contract = engine.contract
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=contract.shape).astype(np.float32)
    mask = np.ones(hidden.shape[1], dtype=bool)
    joints = np.array([0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785, 0.04], dtype=np.float32)
    for missing in (None, np.zeros(0), XY[:3], np.r_[XY[:3], np.nan]):
        assert engine.infer(hidden, mask, joints, 1, missing) is None
        assert "localiser" in engine.refusal_reason
    chunk = engine.infer(hidden, mask, joints, 1, XY)
    direct = HeadPolicy.load(positions_policy).infer(hidden, mask, np.r_[joints, XY])
    np.testing.assert_array_equal(chunk, direct)
    assert not np.array_equal(chunk, engine.infer(hidden, mask, joints, 1, XY + 0.05))  # the positions are read


def test_perception_reads_the_positions_with_the_contracts_localiser_and_refuses_a_broken_one_once(
        positions_policy, tmp_path):
    from m2vla_core.heads.localiser import NamedObjectReader, load_localiser

    engine = PerceptionEngine(PerceptionConfig(cache_bytes=0))
    engine.load()
    frame = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert engine.use_localiser(str(positions_policy)) is True and engine.use_localiser(str(positions_policy)) is False
    xy = engine.read_named_objects(frame, "put the red cube in the blue tray")
    reader = NamedObjectReader(load_localiser(positions_policy), engine.backbone)
    np.testing.assert_array_equal(xy, reader.read(frame, "put the red cube in the blue tray"))
    assert xy.shape == (4,) and np.isfinite(xy).all()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "localiser.json").write_text((positions_policy / "localiser.json").read_text())
    with pytest.raises(ValueError, match="object localiser"):
        engine.use_localiser(str(broken))
    assert engine.reader is None and engine.use_localiser(str(broken)) is False  # not retried per frame
    assert engine.use_localiser("") is True and engine.reader is None


def test_in_the_graph_the_features_carry_the_read_positions_and_the_arm_moves(stack, positions_policy):
    client = stack.client
    seen: list[tuple[int, tuple[float, ...]]] = []
    shown: list = []  # rviz markers: where the localiser read the objects
    client.node.create_subscription(LayerFeatures, "/m2vla/features",
                                    lambda m: seen.append((int(m.instruction_id), tuple(m.named_objects_xy))),
                                    qos.FEATURES)
    client.node.create_subscription(MarkerArray, "/m2vla/named_objects", shown.append, qos.STATUS)
    try:
        answer = client.call(LoadPolicy, "/m2vla_policy/load_policy", LoadPolicy.Request(checkpoint=str(positions_policy)))
        assert answer.success, answer.message
        t0 = stack.publish_instruction("put the red cube in the blue tray")
        stack.wait_for_motion(t0, chunks=3)
        values = client.wait_for(lambda: (v := client.diagnostics("m2vla_perception", t0)) and
                                 int(v.get("localiser_readings", 0)) >= 1 and v, 30.0, "a localiser reading")
        assert values["localiser"] == str(positions_policy.resolve())
        latest = seen[-1][0]
        readings = {xy for instruction_id, xy in seen if instruction_id == latest}
        assert len(readings) == 1, f"one reading per instruction, reused by every message: {readings}"
        reading = next(iter(readings))
        assert len(reading) == 4 and np.isfinite(reading).all()
        markers = client.wait_for(lambda: shown and shown[-1].markers, 10.0, "the named objects' markers")
        np.testing.assert_allclose([(m.pose.position.x, m.pose.position.y) for m in markers],
                                   np.reshape(reading, (2, 2)), atol=1e-6)
        assert {m.header.frame_id for m in markers} == {"panda_link0"}
    finally:
        answer = client.call(LoadPolicy, "/m2vla_policy/load_policy", LoadPolicy.Request(checkpoint=str(stack.policy)))
        assert answer.success, answer.message
        t1 = time.monotonic()
        client.wait_for(lambda: (s := client.latest("policy_status", t1)) and s.checkpoint == str(stack.policy),
                        30.0, "the session's head back")
