"""PyBullet task suite (Panda, coloured cubes, zones, tray), scripted experts, LeRobot recording.

Plain Python, no ROS: ``TaskEnv(SimConfig()).reset(task, seed)`` / ``step(action)`` /
``success()``; the ROS sim node wraps the same object.
"""

from m2vla_core.sim.env import ACTION_DIM, EpisodeTracker, Observation, TaskEnv
from m2vla_core.sim.experts import ExpertAgent, ExpertConfig, ScriptedExpert, make_expert, run_expert_episode
from m2vla_core.sim.scene import CameraConfig, SimConfig
from m2vla_core.sim.tasks import EpisodeSpec, Task, get_task, parse_task_list, task_names

__all__ = [
    "ACTION_DIM", "CameraConfig", "EpisodeSpec", "EpisodeTracker", "ExpertAgent", "ExpertConfig", "Observation", "ScriptedExpert",
    "SimConfig", "Task", "TaskEnv", "get_task", "make_expert", "parse_task_list", "run_expert_episode", "task_names",
]
