"""One source of truth for the node graph: the launch file and `m2vla bringup` both come from
m2vla_ros.graph, and every parameter they set exists in the node's YAML."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / "m2vla_ros" / "launch" / "bringup.launch.py"
CONFIG_DIR = REPO / "m2vla_ros" / "config"


def _graph():
    from m2vla_ros import graph  # imported from the colcon install (PYTHONPATH set by `m2vla env`)

    return graph


@pytest.mark.parametrize("words", [[], ["sim:=false"], ["sim:=true", "device:=cuda", "policy:=/tmp/ckpt"]])
def test_bringup_dry_run_starts_exactly_the_spec_nodes(words, ros_env, python):
    graph = _graph()
    from m2vla_ros.bringup import node_command

    out = subprocess.run([python, "-m", "m2vla_ros.cli", "bringup", "--dry-run", *words],
                         env=ros_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    expected = graph.resolve(graph.parse_arguments(words))
    assert [s["name"] for s in started] == [n.name for n in expected]
    assert [s["cmd"][1:] for s in started] == [node_command(n, graph.config_dir())[1:] for n in expected]


def test_camera_size_sets_the_sim_cameras_square_frames_and_empty_keeps_sim_yaml():
    graph = _graph()
    sim = {n.name: n for n in graph.resolve(graph.parse_arguments(["camera_size:=448"]))}["m2vla_sim"]
    assert (sim.overrides["image_width"], sim.overrides["image_height"]) == (448, 448)
    sim = {n.name: n for n in graph.resolve(graph.parse_arguments([]))}["m2vla_sim"]
    assert "image_width" not in sim.overrides


def test_sim_false_drops_the_sim_node_and_targets_ros2_control():
    graph = _graph()
    nodes = {n.name: n for n in graph.resolve(graph.parse_arguments(["sim:=false"]))}
    assert "m2vla_sim" not in nodes
    assert nodes["m2vla_controller"].overrides["output"] == "joint_trajectory"
    assert "m2vla_sim" in {n.name for n in graph.resolve(graph.parse_arguments(["sim:=true"]))}


def test_launch_file_declares_every_argument_and_builds_nodes_only_from_the_spec():
    tree = ast.parse(LAUNCH_FILE.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    called = {ast.unparse(c.func) for c in calls}
    assert "graph.resolve" in called, "the launch file must take its nodes from graph.resolve"
    comprehensions = [n for n in ast.walk(tree) if isinstance(n, (ast.ListComp, ast.GeneratorExp))]
    assert any(ast.unparse(comp.generators[0].iter) == "graph.ARGUMENTS" and isinstance(comp.elt, ast.Call)
               and ast.unparse(comp.elt.func) == "DeclareLaunchArgument" for comp in comprehensions), \
        "every launch argument must be declared from graph.ARGUMENTS"
    node_calls = [c for c in calls if ast.unparse(c.func) == "Node"]
    literal_executables = [kw.value.value for c in node_calls for kw in c.keywords
                           if kw.arg == "executable" and isinstance(kw.value, ast.Constant)]
    assert set(literal_executables) <= {"rviz2", "robot_state_publisher"}, literal_executables


def test_every_parameter_the_spec_sets_is_declared_in_the_node_yaml():
    graph = _graph()
    for words in ([], ["sim:=false"], ["camera_size:=448"]):
        for node in graph.resolve(graph.parse_arguments(words)):
            data = yaml.safe_load((CONFIG_DIR / node.params_file).read_text())
            assert node.name in data, f"{node.params_file} must be keyed by the node name {node.name}"
            params = data[node.name]["ros__parameters"]
            missing = set(node.overrides) - set(params)
            assert not missing, f"{node.name}: overrides {missing} not declared in {node.params_file}"


@pytest.mark.parametrize("bad", [["sim"], ["simm:=true"], ["device:=tpu"], ["camera_size:=big"], ["camera_size:=4"]])
def test_bad_launch_arguments_are_refused_with_a_clear_message(bad, ros_env, python):
    out = subprocess.run([python, "-m", "m2vla_ros.cli", "bringup", "--dry-run", *bad],
                         env=ros_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "m2vla bringup:" in out.stderr
