"""A peer process for the DDS round-trip test.

role "echo":   subscribes /rt/ping (m2vla_msgs/ActionChunk) and republishes each message on /rt/pong.
role "client": publishes a known ActionChunk on /rt/ping until it sees it back on /rt/pong,
               then prints the received fields as one JSON line and exits 0 (exit 3 on timeout).
"""

from __future__ import annotations

import json
import sys
import time

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from m2vla_msgs.msg import ActionChunk

QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def make_chunk() -> ActionChunk:
    msg = ActionChunk()
    msg.header.frame_id = "panda_link0"
    msg.header.stamp.sec = 12
    msg.header.stamp.nanosec = 345
    msg.action_space = ActionChunk.ACTION_SPACE_JOINT
    msg.names = [f"panda_joint{i}" for i in range(1, 8)] + ["gripper"]
    msg.horizon = 3
    msg.dim = 8
    msg.dt = 0.1
    msg.values = [0.25 * i - 1.5 for i in range(24)]
    msg.observation_stamp.sec = 11
    msg.sequence_id = 2**40 + 7
    msg.instruction_id = 42
    return msg


def as_dict(msg: ActionChunk) -> dict:
    return {
        "frame_id": msg.header.frame_id,
        "stamp": [msg.header.stamp.sec, msg.header.stamp.nanosec],
        "action_space": int(msg.action_space),
        "names": list(msg.names),
        "horizon": int(msg.horizon),
        "dim": int(msg.dim),
        "dt": float(msg.dt),
        "values": [float(v) for v in msg.values],
        "observation_stamp": [msg.observation_stamp.sec, msg.observation_stamp.nanosec],
        "sequence_id": int(msg.sequence_id),
        "instruction_id": int(msg.instruction_id),
    }


def main(role: str, timeout_s: float) -> int:
    rclpy.init()
    node = Node(f"roundtrip_{role}")
    received: list[ActionChunk] = []
    try:
        if role == "echo":
            pub = node.create_publisher(ActionChunk, "/rt/pong", QOS)
            node.create_subscription(ActionChunk, "/rt/ping", pub.publish, QOS)
            deadline = time.monotonic() + timeout_s
            while rclpy.ok() and time.monotonic() < deadline:
                rclpy.spin_once(node, timeout_sec=0.1)
            return 0
        pub = node.create_publisher(ActionChunk, "/rt/ping", QOS)
        node.create_subscription(ActionChunk, "/rt/pong", received.append, QOS)
        deadline = time.monotonic() + timeout_s
        next_send = 0.0
        while not received and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                pub.publish(make_chunk())
                next_send = time.monotonic() + 0.2
            rclpy.spin_once(node, timeout_sec=0.05)
        if not received:
            print("no echo received", file=sys.stderr)
            return 3
        print(json.dumps(as_dict(received[0])))
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 30.0))
