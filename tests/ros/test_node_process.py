"""How every node process stops (m2vla_ros.node_process), in real processes with real rclpy."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from m2vla_ros import node_process

# A node with a slow timer callback; ``behaviour`` picks what the test wants from it.
NODE_SCRIPT = textwrap.dedent("""
    import atexit, os, signal, sys, time
    from m2vla_ros.executor import SingleSubmitMultiThreadedExecutor
    from rclpy.node import Node
    from m2vla_ros import node_process

    behaviour = sys.argv[1]

    class Slow(Node):
        def __init__(self):
            if behaviour == "bad_parameters":
                raise ValueError("max_speed must be > 0")
            super().__init__("m2vla_test_slow")
            self.create_timer(0.05, self.work)
            print("ready", flush=True)

        def work(self):
            print("callback started", flush=True)
            time.sleep(1.5)
            print("callback finished", flush=True)

        def destroy_node(self):
            print("destroying", flush=True)
            if behaviour == "hang_in_teardown":
                time.sleep(120)
            super().destroy_node()

    if behaviour == "crash_at_exit":  # what a native library's static destructor can do at exit
        atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))
    node_process.run("m2vla_test_slow", Slow, lambda: SingleSubmitMultiThreadedExecutor(num_threads=2))
""")


def _start(behaviour: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, behaviour], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _wait_for_line(log: Path, line: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if line in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {line!r} in {timeout_s} s:\n{log.read_text()}")


def _exit_code_after_sigint(behaviour: str, log: Path, env: dict[str, str], once: str) -> int:
    """Start the node, SIGINT it once ``once`` is in its log -> its exit code."""
    proc = _start(behaviour, log, env)
    try:
        _wait_for_line(log, once, 60.0)
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=node_process.TEARDOWN_LIMIT_S + 5.0)
    finally:
        proc.kill()


def test_sigint_lets_the_running_callback_finish_before_the_node_is_destroyed_and_exits_0(tmp_path, ros_env):
    log = tmp_path / "node.log"
    assert _exit_code_after_sigint("clean", log, ros_env, once="callback started") == 0, log.read_text()
    lines = log.read_text().splitlines()
    assert "destroying" in lines
    assert lines.index("callback finished") < lines.index("destroying"), lines


def test_a_clean_stop_exits_0_even_if_a_library_would_crash_while_the_process_exits(tmp_path, ros_env):
    log = tmp_path / "node.log"
    assert _exit_code_after_sigint("crash_at_exit", log, ros_env, once="ready") == 0, log.read_text()
    assert "destroying" in log.read_text().splitlines()


def test_a_bad_parameter_set_exits_2_with_a_one_line_reason(tmp_path, ros_env):
    log = tmp_path / "node.log"
    proc = _start("bad_parameters", log, ros_env)
    try:
        assert proc.wait(timeout=60.0) == 2
    finally:
        proc.kill()
    assert "m2vla_test_slow: invalid configuration: max_speed must be > 0" in log.read_text()


@pytest.mark.parametrize("params, reason", [
    (["command_rate_hz:=0.5"], "command_rate_hz"),  # outside its declared range: rclpy refuses it
    (["command_rate_hz:=250"], "command_rate_hz"),  # an int for a float: rclpy refuses it
    (["joint_names:=[a,b,c,d,e,f,g,h]"], "workspace_check needs the 7 Panda arm joints"),  # the box cannot be checked
    (["output:=joint_trajectory", "trajectory_joint_names:=[panda_joint1,panda_joint1]"], "more than once"),
])
def test_a_controller_given_parameters_it_cannot_honour_exits_2_with_a_one_line_reason(tmp_path, ros_env, params,
                                                                                       reason):
    log = tmp_path / "controller.log"
    args = [sys.executable, "-m", "m2vla_ros.controller_node", "--ros-args"]
    for p in params:
        args += ["-p", p]
    proc = subprocess.Popen(args, env=ros_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        assert proc.wait(timeout=60.0) == 2, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "m2vla_controller: invalid configuration:" in text and reason in text, text
    assert "Traceback" not in text, text


def test_parameters_are_read_only_so_a_set_at_run_time_is_refused_not_silently_ignored(ros_domain_id):
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from m2vla_ros.params import declare_parameters

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    try:
        node = Node("m2vla_test_params", context=context)
        values = declare_parameters(node, {"rate_hz": (10.0, "a rate", (1.0, 100.0))})
        result = node.set_parameters([Parameter("rate_hz", value=20.0)])[0]
        assert not result.successful and "read-only" in result.reason
        assert values["rate_hz"] == node.get_parameter("rate_hz").value == 10.0
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_a_teardown_that_hangs_is_cut_off_in_bounded_time_and_the_log_says_where(tmp_path, ros_env):
    log = tmp_path / "node.log"
    assert _exit_code_after_sigint("hang_in_teardown", log, ros_env, once="ready") == 1, log.read_text()
    text = log.read_text()
    assert "destroying" in text.splitlines()
    assert node_process.TEARDOWN_TIMEOUT_MARK in text
    assert "in destroy_node" in text, text  # the stack of the thread that hung


def test_sigusr1_prints_every_threads_stack_and_the_node_keeps_running(tmp_path, ros_env):
    log = tmp_path / "node.log"
    proc = _start("clean", log, ros_env)
    try:
        _wait_for_line(log, "callback started", 60.0)
        node_process.request_stack_dumps([proc])
        _wait_for_line(log, "in work", 5.0)  # the callback's frame, in a worker thread
        assert proc.poll() is None
        count = log.read_text().count("callback started")
        _wait_for_line(log, "callback finished", 5.0)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and log.read_text().count("callback started") == count:
            time.sleep(0.05)
        assert log.read_text().count("callback started") > count, "the node stopped working after the dump"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=node_process.TEARDOWN_LIMIT_S + 5.0)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_native_stacks_show_where_a_live_process_waits_and_leave_it_running():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        stacks = node_process.native_stacks(sleeper.pid)
        if "Operation not permitted" in stacks or "Could not attach" in stacks:
            pytest.skip("this machine does not allow ptrace (Yama ptrace_scope, or no CAP_SYS_PTRACE)")
        assert "nanosleep" in stacks or "select" in stacks, stacks[-2000:]
        assert sleeper.poll() is None  # gdb detached: the process runs on
    finally:
        sleeper.kill()
        sleeper.wait()

