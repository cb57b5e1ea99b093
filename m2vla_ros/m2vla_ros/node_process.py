"""How a node process runs and stops: in bounded time, and saying where it hung if it did.

- ``run()``: every node's ``main``. A bad parameter set (ValueError from the node's constructor, or rclpy's
  refusal of a value outside its declared range or of the wrong type) exits with code 2 and a
  one-line message; SIGINT/SIGTERM stop the executor, which lets running
  callbacks finish before the node is destroyed, then rclpy shuts down and its context (the DDS
  participant) is destroyed: exit code 0. The process then ends at once (``os._exit`` after
  flushing its output), without running C++ static
  destructors: Fast DDS's singletons can crash there (rmw_fastrtps issue 761 reports SIGSEGV at
  exit and this workaround; our sim node exited -11 once in CI after a clean stop, where exactly
  is unknown), and a node has nothing left to save once its DDS participant is gone.
- ``enable_stack_dumps()``: SIGUSR1 makes the process print every thread's Python stack to
  stderr (its log) and go on running; a fatal signal (SIGSEGV, SIGABRT, ...) prints them before
  the process dies, so a crash in native code (DDS, PyBullet) says which Python call made it.
  ``m2vla bringup`` and the tests send SIGUSR1 to a node that did not stop within its grace
  period after SIGINT, before they escalate; ``kill -USR1 <pid>`` does the same for a node that
  looks stuck while running.
- ``bound_teardown()``: called once the executor has stopped. If stopping the callbacks,
  destroying the node and the DDS participant has not finished within ``TEARDOWN_LIMIT_S``, the
  stacks are printed and the process exits with code 1 (Python's faulthandler does both from its
  own thread, without the GIL). A node whose teardown hangs is gone in bounded time instead of
  waiting for SIGKILL, and its log says where it hung.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import rclpy
import rclpy.utilities
from rclpy.exceptions import ParameterException
from rclpy.executors import Executor, ExternalShutdownException
from rclpy.node import Node

DUMP_SIGNAL = signal.SIGUSR1
DUMP_WAIT_S = 0.5  # [s] time for a dump to be written before the process is signalled again
TEARDOWN_LIMIT_S = 6.0  # [s] stop callbacks, destroy node, shut down rclpy; a clean one takes about a second
TEARDOWN_TIMEOUT_MARK = "Timeout ("  # faulthandler's first line when the teardown limit cut the process off


def run(name: str, make_node: Callable[[], Node], make_executor: Callable[[], Executor],
        args: list[str] | None = None) -> None:
    """Spin one node until SIGINT/SIGTERM; see the module docstring for exit codes."""
    enable_stack_dumps()
    rclpy.init(args=args)
    node: Node | None = None
    executor: Executor | None = None
    code = 0
    try:
        try:
            node = make_node()
        except (ValueError, ParameterException) as exc:  # a bad parameter set: fail loudly at start, never run with it
            print(f"{name}: invalid configuration: {exc}", file=sys.stderr, flush=True)
            code = 2
        else:
            executor = make_executor()
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        if rclpy.ok():  # rclpy raises RuntimeError from a wait set torn down by a signal: not an error
            raise
    finally:
        bound_teardown()
        if executor is not None:
            executor.shutdown()  # callbacks still running in worker threads finish before their node goes
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        # the DDS participant is deleted here (it announces its end to the peers), not left to exit
        rclpy.utilities.get_default_context().destroy()
    exit_now(code)


def exit_now(code: int) -> None:
    """Flush what the process printed and logged, then end it without interpreter or C++ finalizers."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def enable_stack_dumps() -> None:
    """Print all threads' stacks to stderr on SIGUSR1 (the node keeps running) and on a crash."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def bound_teardown(limit_s: float = TEARDOWN_LIMIT_S) -> None:
    """From now on the process has ``limit_s`` to exit; past it, print the stacks and exit(1)."""
    faulthandler.dump_traceback_later(limit_s, exit=True, file=sys.stderr)


def request_stack_dumps(processes: list[subprocess.Popen]) -> None:
    """Ask processes that are still alive for their stacks, and give them a moment to write them."""
    alive = [p for p in processes if p.poll() is None]
    for p in alive:
        try:
            p.send_signal(DUMP_SIGNAL)
        except ProcessLookupError:
            pass
    if alive:
        time.sleep(DUMP_WAIT_S)


def native_stacks(pid: int, timeout_s: float = 20.0) -> str:
    """Every thread's native stack of a live process, from gdb when it is installed ("" otherwise).

    Python's dump shows only Python threads; a node stuck inside DDS or a wait set needs these.
    """
    gdb = shutil.which("gdb")
    if gdb is None:
        return ""
    try:
        done = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-iex", "set debuginfod enabled off",
                               "-ex", "thread apply all bt"],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"gdb did not answer within {timeout_s:.0f} s"
    return done.stdout + done.stderr
