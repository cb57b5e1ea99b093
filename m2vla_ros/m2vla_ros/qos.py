"""QoS profiles of every m2vla topic, defined once and passed in by the nodes.

Compatibility rules that drove the choices (DDS request-vs-offered matching):
- a best-effort subscription matches reliable and best-effort publishers, so subscriptions
  to sensor streams are best-effort (newest wins, depth 1), and our *publishers* of sensor
  streams are reliable so any subscriber matches (rviz, ``ros2 topic echo``,
  robot_state_publisher, a reliable recorder);
- a transient-local subscription does NOT match a volatile publisher. The e-stop is
  therefore volatile on both sides, so a plain ``ros2 topic pub /m2vla/estop`` is never
  silently ignored; latched topics (instruction, feature contract) need transient-local
  publishers (``ros2 topic pub`` is reliable + transient-local by default since Humble,
  ros2cli PR #653; a node publishing with the default volatile QoS does not match).

| profile     | reliability | durability      | history    | topics |
|-------------|-------------|-----------------|------------|--------|
| SENSOR      | best effort | volatile        | keep last 1  | subscriptions: /joint_states, /camera/image_raw, /camera/camera_info |
| SENSOR_PUB  | reliable    | volatile        | keep last 1  | publishers of the same (sim node) |
| INSTRUCTION | reliable    | transient local | keep last 1  | /m2vla/instruction |
| LATCHED     | reliable    | transient local | keep last 1  | /m2vla/feature_contract (also republished every contract_period_s) |
| FEATURES    | reliable    | volatile        | keep last 1  | /m2vla/features (large; best effort drops fragmented messages) |
| CHUNKS      | reliable    | volatile        | keep last 1  | /m2vla/action_chunk (newest wins; a lost chunk is a stale hold) |
| COMMANDS    | reliable    | volatile        | keep last 1  | /m2vla/joint_command, /<controller>/joint_trajectory |
| ESTOP       | reliable    | volatile        | keep last 10 | /m2vla/estop (no e-stop message is overwritten by another) |
| STATUS      | reliable    | volatile        | keep last 10 | status, diagnostics, markers, task status, ee pose |
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy


def _profile(reliability: ReliabilityPolicy, durability: DurabilityPolicy, depth: int) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)


_R, _BE = ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT
_V, _TL = DurabilityPolicy.VOLATILE, DurabilityPolicy.TRANSIENT_LOCAL

SENSOR = _profile(_BE, _V, 1)
SENSOR_PUB = _profile(_R, _V, 1)
INSTRUCTION = _profile(_R, _TL, 1)
LATCHED = _profile(_R, _TL, 1)
FEATURES = _profile(_R, _V, 1)
CHUNKS = _profile(_R, _V, 1)
COMMANDS = _profile(_R, _V, 1)
ESTOP = _profile(_R, _V, 10)
STATUS = _profile(_R, _V, 10)

PROFILES = {"SENSOR": SENSOR, "SENSOR_PUB": SENSOR_PUB, "INSTRUCTION": INSTRUCTION, "LATCHED": LATCHED,
            "FEATURES": FEATURES, "CHUNKS": CHUNKS, "COMMANDS": COMMANDS, "ESTOP": ESTOP, "STATUS": STATUS}
