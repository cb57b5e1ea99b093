"""The perception node in a real process over real DDS: what it says while it waits, and what it waits for."""

from __future__ import annotations

import threading
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from m2vla_msgs.msg import FeatureContract
from m2vla_ros import qos
from test_controller_node import _log_tails, _start, _stop

WAIT_S = 90.0  # process start imports torch and loads the VLM on a shared 2-core machine


def test_perception_waiting_for_a_contract_says_how_many_publishers_dds_matched(tmp_path, ros_domain_id):
    """0 matched says discovery failed; 1 matched and still waiting says the samples do not arrive."""
    log = tmp_path / "perception.log"
    perception = _start("m2vla_ros.perception_node", ros_domain_id, log)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    node = Node("m2vla_test_operator", context=ctx)
    messages: list[str] = []
    lock = threading.Lock()

    def on_diagnostics(msg: DiagnosticArray) -> None:
        with lock:
            messages.extend(s.message for s in msg.status if s.name == "m2vla_perception")

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with lock:
                if any(text in m for m in messages):
                    return
            time.sleep(0.1)
        raise AssertionError(f"no perception diagnostics with {text!r} in {WAIT_S:.0f} s; last: {messages[-1:]}; "
                             f"log: {log.read_text()[-2000:]}")

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, qos.STATUS)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        wait_for("the policy's feature contract (0 publisher(s) matched)")
        node.create_publisher(FeatureContract, "/m2vla/feature_contract", qos.LATCHED)  # matched, publishes nothing
        wait_for("the policy's feature contract (1 publisher(s) matched)")
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        assert _stop(perception, log) in (0, -2), _log_tails(log)


REFRESH_S = 10.0


def test_with_a_localiser_an_instructions_features_wait_for_a_frame_received_after_it(tmp_path, ros_domain_id):
    """The frame on hand when an instruction arrives may show the scene before a reset: the
    localiser must not read it, so no features of that instruction go out until a newer frame."""
    from m2vla_core.backbone import FrozenBackbone, default_backbone_path
    from m2vla_core.heads.localiser import LocaliserConfig, ObjectLocaliser, save_localiser
    from m2vla_core.sim.tasks import object_keys
    from m2vla_msgs.msg import LayerFeatures
    from m2vla_ros.conversions import array_to_image, contract_to_msg
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    backbone = FrozenBackbone.from_pretrained(str(default_backbone_path()))
    localiser_dir = tmp_path / "localiser"
    save_localiser(ObjectLocaliser(LocaliserConfig(backbone_id=backbone.backbone_id,
                                                   backbone_digest=backbone.weights_digest, object_keys=object_keys(),
                                                   image_size=56, num_image_tokens=4)), localiser_dir)
    contract = contract_to_msg(backbone.contract((2,), num_image_tokens=4, num_text_tokens=4))
    contract.backbone_digest, contract.localiser = backbone.weights_digest, str(localiser_dir)

    log = tmp_path / "perception.log"
    # re-runs on new frames of the same instruction at most every 10 s: a new instruction must not wait for that
    perception = _start("m2vla_ros.perception_node", ros_domain_id, log, "max_image_age_s:=30.0",
                        f"refresh_period_s:={REFRESH_S}")
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    node = Node("m2vla_test_camera", context=ctx)
    features: list[tuple[float, int, tuple]] = []
    lock = threading.Lock()

    def on_features(msg: LayerFeatures) -> None:
        with lock:
            features.append((time.monotonic(), int(msg.instruction_id), tuple(msg.named_objects_xy)))

    node.create_subscription(LayerFeatures, "/m2vla/features", on_features, qos.FEATURES)
    contract_pub = node.create_publisher(FeatureContract, "/m2vla/feature_contract", qos.LATCHED)
    image_pub = node.create_publisher(Image, "/camera/image_raw", qos.SENSOR_PUB)
    instruction_pub = node.create_publisher(String, "/m2vla/instruction", qos.INSTRUCTION)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    rng = np.random.default_rng(0)

    def frame() -> Image:
        return array_to_image(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                              stamp=node.get_clock().now().to_msg())

    def wait_for_features(since: float, what: str) -> tuple:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with lock:
                got = [f for f in features if f[0] >= since]
            if got:
                return got[0]
            contract_pub.publish(contract)  # as the policy republishes it every contract_period_s
            time.sleep(0.2)
        raise AssertionError(f"no features {what} in {WAIT_S:.0f} s; log: {log.read_text()[-2000:]}")

    try:
        # a first instruction with frames streaming: the node is up and reads positions
        instruction_pub.publish(String(data="pick up the red cube"))
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            image_pub.publish(frame())
            contract_pub.publish(contract)
            with lock:
                if features:
                    break
            time.sleep(0.1)
        first = wait_for_features(0.0, "for the first instruction")
        assert len(first[2]) == 4 and np.isfinite(first[2]).all()
        # the camera stops; a new instruction arrives with only an older frame on hand
        time.sleep(0.5)
        t_instruction = time.monotonic()
        instruction_pub.publish(String(data="lift the blue block"))
        time.sleep(2.0)
        with lock:
            newer = [f for f in features if f[1] > first[1]]
        assert not newer, f"features of the new instruction from a frame older than it: {newer[:1]}"
        t_frame = time.monotonic()
        image_pub.publish(frame())  # a frame taken after the instruction
        got = wait_for_features(t_instruction, "after a frame newer than the instruction")
        assert got[1] > first[1] and len(got[2]) == 4 and np.isfinite(got[2]).all()
        assert got[0] - t_frame < REFRESH_S / 2, "the new instruction waited for the same-instruction throttle"
        # "stop" names no object the localiser knows: its features go out without positions (the
        # policy then refuses to act and the arm holds), and the log says why
        instruction_pub.publish(String(data="stop"))
        deadline = time.monotonic() + WAIT_S
        refused: list[tuple] = []
        while not refused and time.monotonic() < deadline:
            image_pub.publish(frame())
            time.sleep(0.2)
            with lock:
                refused = [f for f in features if f[1] > got[1]]
        assert refused and refused[0][2] == (), f"features of 'stop': {refused[:1]}; log: {log.read_text()[-2000:]}"
        assert "no_known_object" in log.read_text()
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        assert _stop(perception, log) in (0, -2), _log_tails(log)
