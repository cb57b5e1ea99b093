"""Bad input on every subscriber and service of the running graph (real processes, real DDS).

Each bad message is refused with a counted reason in /diagnostics (and the status messages),
no node dies, and the arm does not move: the controller keeps streaming the held position.
"""

from __future__ import annotations

import array
import json
import shutil
import time

import numpy as np
from safety_support import TEST_FRAME, build_random_policy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from m2vla_core.control import PANDA_JOINT_NAMES
from m2vla_msgs.msg import ActionChunk, FeatureContract, LayerFeatures
from m2vla_msgs.srv import LoadPolicy
from m2vla_ros import qos
from m2vla_ros.conversions import ns_to_stamp, stamp_to_ns

NAMES = list(PANDA_JOINT_NAMES)
SIM_NAMES = NAMES[:7] + ["panda_finger_joint1", "panda_finger_joint2"]
DIAG_WAIT_S = 20.0


def _image(height: int, width: int, encoding: str, step: int, size: int) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, step=step)
    msg.header.frame_id = TEST_FRAME
    msg.data = array.array("B", bytes(size))
    return msg


def _now_ns(node) -> int:
    return node.get_clock().now().nanoseconds


def _chunk(node, values, *, sequence_id: int, observation_age_s: float = 0.0, names=NAMES, space: int = 0,
           horizon: int | None = None) -> ActionChunk:
    values = np.asarray(values, dtype=np.float32)
    now = _now_ns(node)
    msg = ActionChunk(action_space=space, names=list(names), horizon=horizon if horizon is not None else len(values),
                      dim=len(names), dt=0.1, sequence_id=sequence_id)
    msg.values = array.array("f", values.reshape(-1).tolist())  # (H, A) -> (H * A,)
    msg.header.stamp = ns_to_stamp(now)
    msg.header.frame_id = TEST_FRAME
    msg.observation_stamp = ns_to_stamp(now - int(observation_age_s * 1e9))
    return msg


def _publish(pub, msgs, gap_s: float, repeat: int = 1) -> None:
    for msg in msgs:
        for _ in range(repeat):
            pub.publish(msg)
            time.sleep(gap_s)


def _publish_until_counted(client, pub, make, field: str, timeout_s: float = 6.0):
    """Publish ``make()`` (a fresh one every 0.5 s) until ControllerStatus.``field`` grows; -> the last
    message. The chunk queue is keep-last 1: on a loaded machine a message can be replaced by the
    next before it is read."""
    def value() -> int:
        status = client.latest("controller_status")
        return getattr(status, field) if status is not None else 0

    before = value()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = make()
        pub.publish(msg)
        if client.wait_for_quietly(lambda: value() > before, 0.5):
            return msg
    raise AssertionError(f"chunk #{msg.sequence_id} was never counted in ControllerStatus.{field}")


def _publish_until_counted_in_diagnostics(client, node: str, pub, by_key: dict, timeout_s: float = 30.0) -> None:
    """Publish each kind's messages in rounds until ``node``'s /diagnostics counts every key.

    Sensor and command queues are keep-last 1 and compete with the graph's own streams (the
    sim's 100 Hz joint states, the controller's 250 Hz commands): on a loaded machine a given
    message may be overwritten unread. A kind that is never counted fails the test.
    """
    before = client.diagnostics(node) or {}
    pending = dict(by_key)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for msgs in pending.values():
            _publish(pub, msgs, 0.02, repeat=3)
        t_sent = time.monotonic()
        client.wait_for_quietly(lambda: client.diagnostics(node, t_sent) is not None, 3.0)  # 1 Hz
        values = client.diagnostics(node) or {}
        pending = {k: m for k, m in pending.items() if int(values.get(k, 0)) <= int(before.get(k, 0))}
    assert not pending, f"{node} never counted {sorted(pending)}: {client.diagnostics(node)}"


def _wait_counts(client, node: str, expected: dict[str, int], since: float) -> dict:
    """Wait for /diagnostics of ``node`` to show at least ``expected`` counts; -> its values."""
    def ok():
        values = client.diagnostics(node, since) or {}
        return values if all(int(values.get(k, 0)) >= n for k, n in expected.items()) else None

    try:
        return client.wait_for(ok, DIAG_WAIT_S, f"{node} to count {expected}")
    except AssertionError:
        raise AssertionError(f"{node} diagnostics: {client.diagnostics(node)}") from None


def test_bad_messages_on_every_subscriber_are_counted_and_nothing_moves(stack):
    client, node = stack.client, stack.client.node
    client.wait_for(lambda: len(client.commands_since(time.monotonic() - 0.5)) > 20, 30.0, "the held command stream")
    held = client.commands_since(time.monotonic() - 0.2)[-1]  # (8,) what the controller holds
    t0 = time.monotonic()
    pubs = {
        "instruction": node.create_publisher(String, "/m2vla/instruction", qos.INSTRUCTION),
        "image": node.create_publisher(Image, "/camera/image_raw", qos.SENSOR_PUB),
        "joints": node.create_publisher(JointState, "/joint_states", qos.SENSOR_PUB),
        "chunk": node.create_publisher(ActionChunk, "/m2vla/action_chunk", qos.CHUNKS),
        "features": node.create_publisher(LayerFeatures, "/m2vla/features", qos.FEATURES),
        "contract": node.create_publisher(FeatureContract, "/m2vla/feature_contract", qos.LATCHED),
        "command": node.create_publisher(JointState, "/m2vla/joint_command", qos.COMMANDS),
    }
    try:
        time.sleep(1.0)  # discovery of the new publishers
        # instructions: empty, whitespace, 1 MB, not-valid-UTF-8 (decoded with replacement), control, no words
        _publish(pubs["instruction"], [String(data=t) for t in (
            "", "  \t\n ", "x" * (1 << 20), "pick up the \ufffd\ufffd cube", "pick\x1b[2J up", "?! ...")], 0.3)
        # images: unknown encoding, zero size, step below a row, data/step mismatch, declared 8K, 2x2 frame
        _publish_until_counted_in_diagnostics(client, "m2vla_perception", pubs["image"], {
            "image:bad_encoding": [_image(64, 64, "yuv422_yuy2", 128, 128 * 64)],
            "image:bad_shape": [_image(0, 0, "rgb8", 0, 0), _image(64, 64, "rgb8", 100, 100 * 64),
                                _image(64, 64, "rgb8", 192, 192 * 64 - 7)],
            "image:too_large": [_image(4320, 7680, "rgb8", 7680 * 3, 1024)],
            "image:bad_image": [_image(2, 2, "rgb8", 6, 12)],
        })
        # joint states: missing names, a name twice, NaN, inf, fewer positions than names
        bad_states = [
            JointState(name=SIM_NAMES[:5], position=[0.0] * 5),
            JointState(name=SIM_NAMES + ["panda_joint1"], position=[0.0] * 10),
            JointState(name=SIM_NAMES, position=[float("nan")] * 9),
            JointState(name=SIM_NAMES, position=[0.0] * 8 + [float("inf")]),
            JointState(name=SIM_NAMES, position=[0.0] * 4),
        ]
        for msg in bad_states:
            msg.header.frame_id = TEST_FRAME
        by_kind = {"joint_state:bad_names": bad_states[:2], "joint_state:non_finite": bad_states[2:4],
                   "joint_state:bad_shape": bad_states[4:]}
        for receiver in ("m2vla_controller", "m2vla_policy"):
            _publish_until_counted_in_diagnostics(client, receiver, pubs["joints"], by_kind)
        # chunks: NaN, wrong shape, out of limits, old, from the future, end-effector space, wrong names
        base = np.tile(held, (4, 1))  # (H, A): the held position, valid in every respect
        nan = base.copy()
        nan[2, 3] = np.nan
        for make in (lambda: _chunk(node, nan, sequence_id=1),
                     lambda: _chunk(node, base, sequence_id=2, horizon=5),  # values shorter than horizon x dim
                     lambda: _chunk(node, base + np.r_[np.zeros(7), 1.0], sequence_id=3),  # gripper 1 m open
                     lambda: _chunk(node, base + np.r_[3.0, np.zeros(7)], sequence_id=4),  # joint 1 beyond its limit
                     lambda: _chunk(node, base, sequence_id=5, observation_age_s=5.0),
                     lambda: _chunk(node, base, sequence_id=6, observation_age_s=-3.0),
                     lambda: _chunk(node, base[:, :7], sequence_id=7, names=NAMES[:7], space=1),
                     lambda: _chunk(node, base, sequence_id=8, names=NAMES[:7] + ["wrist_cam"])):
            _publish_until_counted(client, pubs["chunk"], make, "chunks_rejected")
        # out-of-order ids need an accepted chunk first: one that holds exactly where the arm is
        accepted = _publish_until_counted(client, pubs["chunk"], lambda: _chunk(node, base, sequence_id=100),
                                          "chunks_accepted")

        def repeat():  # the same chunk again (same id, same observation)
            msg = _chunk(node, base, sequence_id=100)
            msg.observation_stamp = accepted.observation_stamp
            return msg

        def older():  # a higher id computed from an older camera frame
            msg = _chunk(node, base, sequence_id=101)
            msg.observation_stamp = ns_to_stamp(stamp_to_ns(accepted.observation_stamp) - int(1e8))
            return msg

        for make in (repeat, older):
            _publish_until_counted(client, pubs["chunk"], make, "chunks_rejected")
        # features that do not fit the loaded head's contract, and a contract no backbone can serve
        features = LayerFeatures(layers=[1], num_image_tokens=1, num_text_tokens=0, width=2, dtype="float32")
        features.mask = array.array("B", [1])
        features.data = array.array("B", bytes(8))
        features.header.stamp = ns_to_stamp(_now_ns(node))
        _publish(pubs["features"], [features], 0.2)
        _publish(pubs["contract"], [FeatureContract(layers=[4, 2], num_image_tokens=16, num_text_tokens=16,
                                                    width=128, dtype="float32")], 0.2)
        # commands straight to the sim (arm driver): NaN, missing joints, a 2 rad jump
        bad_commands = [JointState(name=NAMES, position=[float("nan")] * 8),
                        JointState(name=NAMES[:3], position=[0.0] * 3),
                        JointState(name=NAMES, position=list(held + np.r_[2.0, np.zeros(7)]))]
        for msg in bad_commands:
            msg.header.frame_id = TEST_FRAME
        _publish_until_counted_in_diagnostics(client, "m2vla_sim", pubs["command"], {
            "command:non_finite": bad_commands[:1], "command:bad_names": bad_commands[1:2],
            "command:jump": bad_commands[2:]})

        perception = _wait_counts(client, "m2vla_perception", {
            "instruction:empty": 2, "instruction:too_long": 1, "instruction:undecodable": 1,
            "instruction:control_chars": 1, "instruction:no_words": 1, "image:bad_encoding": 1,
            "image:bad_shape": 1, "image:too_large": 1, "image:bad_image": 1, "contract:bad_contract": 1}, t0)
        controller = _wait_counts(client, "m2vla_controller", {
            "chunk:non_finite": 1, "chunk:bad_shape": 1, "chunk:out_of_limits": 2, "chunk:stale_stamp": 1,
            "chunk:future_stamp": 1, "chunk:unsupported": 1, "chunk:bad_names": 1, "chunk:out_of_order": 2,
            "joint_state:bad_names": 1, "joint_state:non_finite": 1, "joint_state:bad_shape": 1}, t0)
        policy = _wait_counts(client, "m2vla_policy", {
            "features:mismatch": 1, "joint_state:bad_names": 1, "joint_state:non_finite": 1}, t0)
        sim = _wait_counts(client, "m2vla_sim", {"command:non_finite": 1, "command:bad_names": 1,
                                                  "command:jump": 1}, t0)
    finally:
        for pub in pubs.values():
            node.destroy_publisher(pub)

    for values in (perception, controller, policy, sim):
        assert values["last_rejection"], "the last rejection's reason is reported"
    status = client.latest("controller_status")
    assert status.chunks_rejected >= 10 and status.chunks_accepted >= 1
    assert client.latest("policy_status").inputs_rejected >= 3
    commands = client.commands_since(t0)
    assert len(commands) > 100, "the controller kept streaming"
    # 1e-6: the one accepted chunk held the arm where it was, through the wire's float32
    assert np.abs(commands - held).max() < 1e-6, "the arm moved on bad input"
    assert not stack.graph.dead(), f"a node died: {stack.graph.dead()}"


def _copy(src, dst):
    shutil.copytree(src, dst)
    (dst / "model.onnx").unlink(missing_ok=True)  # torch backend: the checks under test are on the safetensors
    return dst


def test_load_policy_refuses_bad_checkpoints_with_their_code_and_keeps_the_running_head(stack, tmp_path):
    client = stack.client
    t0 = stack.publish_instruction("pick up the red cube")
    stack.wait_for_motion(t0, chunks=2)  # features flowed: the policy knows perception's backbone digest
    good = stack.policy

    pickled = _copy(good, tmp_path / "pickled")
    (pickled / "model.safetensors").write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")  # a pickle
    extra_pickle = _copy(good, tmp_path / "extra_pickle")
    (extra_pickle / "optimizer.pt").write_bytes(b"PK\x03\x04 torch zip archive")
    truncated = _copy(good, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    unknown_key = _copy(good, tmp_path / "unknown_key")
    config = json.loads((unknown_key / "config.json").read_text())
    config["chunk_lenght"] = 32
    (unknown_key / "config.json").write_text(json.dumps(config))
    other_backbone = _copy(good, tmp_path / "other_backbone")
    config = json.loads((other_backbone / "config.json").read_text())
    config["backbone_digest"] = "ab" * 32
    (other_backbone / "config.json").write_text(json.dumps(config))

    unnamed = build_random_policy(tmp_path / "six_unnamed_joints", export=False, joints=6)
    blind = build_random_policy(tmp_path / "positions_without_localiser", export=False, object_positions=True,
                                localiser=False)

    cases = [
        ("/nonexistent/checkpoint", "", LoadPolicy.Request.NOT_FOUND, "no such"),
        (str(pickled), "torch", LoadPolicy.Request.INVALID_CHECKPOINT, "pickle"),
        (str(extra_pickle), "torch", LoadPolicy.Request.INVALID_CHECKPOINT, "pickle"),
        (str(truncated), "torch", LoadPolicy.Request.INVALID_CHECKPOINT, "truncated"),
        (str(unknown_key), "torch", LoadPolicy.Request.INVALID_CHECKPOINT, "chunk_lenght"),
        (str(other_backbone), "torch", LoadPolicy.Request.CONTRACT_MISMATCH, "backbone"),
        (str(good), "tensorflow", LoadPolicy.Request.BACKEND_ERROR, "backend"),
        (str(unnamed), "torch", LoadPolicy.Request.INVALID_CHECKPOINT, "joints"),  # loads, but fits no arm here
        (str(blind), "torch", LoadPolicy.Request.INVALID_CHECKPOINT, "no object localiser"),  # eval-only head
    ]
    for checkpoint, backend, code, words in cases:
        answer = client.call(LoadPolicy, "/m2vla_policy/load_policy", LoadPolicy.Request(checkpoint=checkpoint,
                                                                                           backend=backend))
        assert not answer.success and answer.error_code == code, (checkpoint, answer.error_code, answer.message)
        assert words in answer.message.lower(), answer.message
    t_after = time.monotonic()
    status = client.wait_for(lambda: client.latest("policy_status", t_after), 10.0, "a policy status")
    assert status.checkpoint == str(good) and status.backend == "onnxruntime", "a refused load replaced the head"
    _wait_counts(client, "m2vla_policy", {"load_policy:not_found": 1, "load_policy:invalid_checkpoint": 6,
                                          "load_policy:contract_mismatch": 1, "load_policy:backend_error": 1}, t_after)
    stack.wait_for_motion(t_after, chunks=2, timeout_s=30.0)  # the running head never stopped
    assert not stack.graph.dead(), f"a node died: {stack.graph.dead()}"
