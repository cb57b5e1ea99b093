"""The control path without ROS: chunk validation, interpolation, blending, limits, holds.

``ChunkStreamer`` turns validated action chunks and measured joint states into one joint
command per period; the ROS controller node only converts messages and keeps time.
"""

from m2vla_core.control.config import (
    PANDA_JOINT_NAMES, PANDA_LIMITS, PRESETS, ControllerConfig, JointLimits, WorkspaceBox, get_preset,
)
from m2vla_core.control.limits import LimitResult, distance_outside_box, limit_step
from m2vla_core.control.streamer import (
    ESTOPPED, HOLD_FOLLOWING_ERROR, HOLDING, TRACKING, ChunkStreamer, Command,
)
from m2vla_core.control.timing import PeriodMonitor, TickGrid
from m2vla_core.control.trajectory import ChunkEnsemble, ChunkTrajectory, smoothstep
from m2vla_core.control.validation import (
    Chunk, check_chunk_order, check_chunk_timing, check_chunk_values, check_joint_positions, reason_code,
)

__all__ = [
    "ESTOPPED", "HOLD_FOLLOWING_ERROR", "HOLDING", "PANDA_JOINT_NAMES", "PANDA_LIMITS", "PRESETS", "TRACKING", "Chunk",
    "ChunkStreamer", "ChunkEnsemble", "ChunkTrajectory", "Command", "ControllerConfig", "JointLimits", "LimitResult",
    "PeriodMonitor", "TickGrid", "WorkspaceBox",
    "check_chunk_order", "check_chunk_timing", "check_chunk_values", "check_joint_positions", "distance_outside_box",
    "get_preset", "limit_step", "reason_code", "smoothstep",
]
