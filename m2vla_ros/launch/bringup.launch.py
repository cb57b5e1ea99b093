"""Bring up m2vla: perception (frozen VLM) -> policy (MoL + MSM) -> controller -> sim or real arm.

    ros2 launch m2vla_ros bringup.launch.py sim:=true rviz:=true
    ros2 launch m2vla_ros bringup.launch.py sim:=false policy:=/path/to/ckpt device:=cuda

The node list, parameter files and argument -> parameter mapping come from
``m2vla_ros.graph`` — the same spec ``m2vla bringup`` starts on machines without launch.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from m2vla_core.robot_model import panda_urdf_for_rviz
from m2vla_ros import graph


def _nodes(context, *args, **kwargs):
    values = {a.name: LaunchConfiguration(a.name).perform(context) for a in graph.ARGUMENTS}
    config = graph.config_dir()
    return [
        Node(
            package=graph.PACKAGE,
            executable=node.executable,
            name=node.name,
            output="screen",
            emulate_tty=True,
            parameters=[str(config / node.params_file), node.overrides],
        )
        for node in graph.resolve(values)
    ]


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument(a.name, default_value=a.default, description=a.description,
                              **({"choices": list(a.choices)} if a.choices else {}))
        for a in graph.ARGUMENTS
    ]
    # rviz shows the robot from /robot_description + TF, which robot_state_publisher derives
    # from /joint_states (published by the sim node or the real arm's driver).
    state_publisher = Node(
        package="robot_state_publisher",
        executable="robot_state_publisher",
        name="robot_state_publisher",
        parameters=[{"robot_description": panda_urdf_for_rviz()}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", str(graph.rviz_config())],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*arguments, OpaqueFunction(function=_nodes), state_publisher, rviz])
