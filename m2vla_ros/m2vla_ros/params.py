"""Declare a node's parameters from one table, with descriptions and ranges.

Table entries: name -> (default, description) or (default, description, (lo, hi)). The type
comes from the default; ranges become rcl Integer/FloatingPointRange so `ros2 param set`
refuses out-of-range values instead of the node discovering them later. Every parameter is
read-only: the nodes read them once at start (into their configs), so a `ros2 param set` at run
time is refused with a reason instead of reported as applied and silently ignored; restart the
node (or its launch) with the new value.
"""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node


def declare_parameters(node: Node, table: dict[str, tuple]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, spec in table.items():
        default, description, *bounds = spec
        descriptor = ParameterDescriptor(description=description, read_only=True)
        if bounds:
            lo, hi = bounds[0]
            if isinstance(default, bool):
                raise TypeError(f"parameter {name}: a bool cannot have a range")
            if isinstance(default, int):
                descriptor.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
        values[name] = node.declare_parameter(name, default, descriptor).value
    return values
