"""``m2vla bringup``: start the node graph of ``graph.resolve`` as separate OS processes.

For machines where ROS 2 launch is not installed. It reads the same node list, parameter
files and argument mapping as ``launch/bringup.launch.py``, forwards SIGINT/SIGTERM to every
node, and shuts them all down cleanly (SIGINT, then SIGTERM, then SIGKILL after timeouts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from m2vla_ros import graph, node_process

SHUTDOWN_GRACE_S = 8.0
# Fast DDS files of dead processes older than this are removed before nodes start: a node
# SIGKILLed earlier leaves its shared-memory ports behind, and a new participant that reuses
# such a port number could be cut off from the others for good (seen here: a perception that
# never received the policy's feature contract, republished every second). Only files whose
# Fast DDS locks prove their users gone are touched (m2vla_core.dds_shm).
STALE_SHM_GRACE_S = 1.0


def node_command(node: graph.ResolvedNode, config_dir: Path) -> list[str]:
    """The exact command line of one node process (what ``ros2 run`` would execute)."""
    cmd = [sys.executable, "-m", f"{graph.PACKAGE}.{node.executable}", "--ros-args",
           "-r", f"__node:={node.name}", "--params-file", str(config_dir / node.params_file)]
    for key, value in node.overrides.items():
        # rcl parses parameter values as YAML: quote strings so "" and "true" stay strings.
        cmd += ["-p", f"{key}:={json.dumps(value) if isinstance(value, str) else value}"]
    return cmd


@dataclass
class RunningNode:
    node: graph.ResolvedNode
    process: subprocess.Popen


class Graph:
    """A set of node processes started from the shared spec; a context manager that always cleans up."""

    def __init__(self, args: dict[str, str], *, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.nodes = graph.resolve(args)
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.running: list[RunningNode] = []
        self.stale_shm_files_removed = 0  # by the last start()

    def commands(self) -> list[list[str]]:
        config = graph.config_dir()
        return [node_command(n, config) for n in self.nodes]

    def start(self) -> None:
        from m2vla_core.dds_shm import remove_stale_segments

        removed = remove_stale_segments(grace_s=STALE_SHM_GRACE_S)
        self.stale_shm_files_removed = len(removed)
        if removed:
            print(f"m2vla bringup: removed {len(removed)} Fast DDS shared-memory files of dead processes",
                  file=sys.stderr, flush=True)
        for node, cmd in zip(self.nodes, self.commands()):
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{node.name}.log", "w", encoding="utf-8")  # noqa: SIM115
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None)
            self.running.append(RunningNode(node, proc))

    def dead(self) -> list[tuple[str, int]]:
        return [(r.node.name, r.process.returncode) for r in self.running if r.process.poll() is not None]

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> dict[str, int]:
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            alive = [r for r in self.running if r.process.poll() is None]
            if not alive:
                break
            if sig != signal.SIGINT:  # SIGINT's grace ran out: the log should say where it hung
                node_process.request_stack_dumps([r.process for r in alive])
            for r in alive:
                r.process.send_signal(sig)
            deadline = time.monotonic() + wait_s
            for r in alive:
                try:
                    r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        return {r.node.name: r.process.returncode for r in self.running}

    def __enter__(self) -> "Graph":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m2vla bringup", description=__doc__.splitlines()[0],
                                     epilog="launch arguments: " + ", ".join(
                                         f"{a.name}:=<{a.default or 'default'}>" for a in graph.ARGUMENTS))
    parser.add_argument("launch_args", nargs="*", help="name:=value, as for ros2 launch")
    parser.add_argument("--dry-run", action="store_true", help="print the node commands as JSON and exit")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each node's output to DIR/<node>.log")
    opts = parser.parse_args(argv)
    try:
        args = graph.parse_arguments(opts.launch_args)
    except ValueError as exc:
        print(f"m2vla bringup: {exc}", file=sys.stderr)
        return 2
    g = Graph(args, log_dir=opts.log_dir)
    if opts.dry_run:
        print(json.dumps([{"name": n.name, "cmd": c} for n, c in zip(g.nodes, g.commands())], indent=2))
        return 0
    if graph._is_true(args["rviz"]):
        print("m2vla bringup: rviz2 is not available without a ROS 2 install; use "
              "`ros2 launch m2vla_ros bringup.launch.py` there (rviz/m2vla.rviz).", file=sys.stderr)
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    g.start()
    print(f"m2vla bringup: started {', '.join(n.name for n in g.nodes)} (Ctrl-C stops all)", flush=True)
    reported: set[str] = set()
    try:
        while not stop_requested:
            for name, code in g.dead():
                if name not in reported:
                    reported.add(name)
                    print(f"m2vla bringup: node {name} exited with code {code}", file=sys.stderr, flush=True)
            if len(reported) == len(g.running):
                break
            time.sleep(0.2)
    finally:
        codes = g.stop()
    print(f"m2vla bringup: stopped ({', '.join(f'{k}={v}' for k, v in codes.items())})", flush=True)
    return 0 if stop_requested else 1
