"""m2vla_core: the ROS-free model library of m2vla.

Frozen VLM backbone -> per-layer hidden states -> Mixture of Layers (MoL) -> Meta Skill
Module (MSM) -> smooth action chunks. Nothing in this package imports rclpy or m2vla_msgs;
the ROS nodes in ``m2vla_ros`` are thin wrappers around it.
"""

__version__ = "0.1.0"
