"""The perception node in a real process over real DDS: what it says while it waits."""

from __future__ import annotations

import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from m2vla_msgs.msg import FeatureContract
from m2vla_ros import qos
from test_controller_node import _start, _stop

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
        assert _stop(perception, log) in (0, -2), log.read_text()[-3000:]
