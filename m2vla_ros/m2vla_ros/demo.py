"""``m2vla demo``: the whole stack, headless, in the PyBullet sim, driven like a user would.

Starts the node graph (``m2vla bringup sim:=true rviz:=false``), then from a separate ROS
client (this process) runs one episode per task: stop the policy, reset the sim to the task
and a held-out seed, publish the sim's instruction on /m2vla/instruction, and wait for the
task's success check on /m2vla/task_status or a timeout. It reports success per task, the
instruction -> first chunk and instruction -> first command latencies, and writes a rollout
GIF per task and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from m2vla_msgs.msg import ActionChunk, PolicyStatus, TaskStatus
from m2vla_msgs.srv import Reset, Stop
from m2vla_ros import qos
from m2vla_ros.bringup import Graph
from m2vla_ros.conversions import diagnostic_values, image_to_rgb

DEFAULT_SEED = 10_000  # held-out range: training data is recorded from seeds below this


@dataclass
class EpisodeResult:
    task: str
    seed: int
    instruction: str
    success: bool
    time_to_success_s: float | None
    first_chunk_ms: float | None
    first_command_ms: float | None
    gif: str | None


class DemoClient(Node):
    """The operator's side: services, instruction publisher, and monitors."""

    def __init__(self, *, context=None) -> None:
        super().__init__("m2vla_demo_client", context=context)
        self.instruction_pub = self.create_publisher(String, "/m2vla/instruction", qos.INSTRUCTION)
        self.sim_reset = self.create_client(Reset, "/m2vla_sim/reset")
        self.policy_stop = self.create_client(Stop, "/m2vla_policy/stop")
        self.controller_reset = self.create_client(Reset, "/m2vla_controller/reset")
        self.lock = threading.Lock()
        self.task_status: TaskStatus | None = None
        self.policy_status: PolicyStatus | None = None
        self.chunk_times: list[tuple[float, int]] = []  # (monotonic, instruction_id)
        self.command_times: list[float] = []
        self.frames: list[np.ndarray] = []
        self.record_frames = False
        self.create_subscription(TaskStatus, "/m2vla/task_status", self._on_task, qos.STATUS)
        self.create_subscription(PolicyStatus, "/m2vla/policy_status", self._on_policy, qos.STATUS)
        self.create_subscription(ActionChunk, "/m2vla/action_chunk", self._on_chunk, qos.CHUNKS)
        self.create_subscription(JointState, "/m2vla/joint_command", self._on_command, qos.COMMANDS)
        self.create_subscription(Image, "/camera/image_raw", self._on_image, qos.SENSOR)
        self.perception: dict[str, str] = {}  # perception's last /diagnostics: "message" and its key/values
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos.STATUS)

    def _on_task(self, msg: TaskStatus) -> None:
        with self.lock:
            self.task_status = msg

    def _on_policy(self, msg: PolicyStatus) -> None:
        with self.lock:
            self.policy_status = msg

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == "m2vla_perception":
                with self.lock:
                    self.perception = diagnostic_values(status)

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self.lock:
            self.chunk_times.append((time.monotonic(), int(msg.instruction_id)))

    def _on_command(self, _msg: JointState) -> None:
        with self.lock:
            if self.chunk_times:  # only commands after a chunk matter for latency
                self.command_times.append(time.monotonic())

    def _on_image(self, msg: Image) -> None:
        if self.record_frames:
            try:
                frame = image_to_rgb(msg, max_pixels=4096 * 4096)
            except ValueError:
                return
            with self.lock:
                self.frames.append(frame)


def call_service(client, request, timeout_s: float):
    if not client.wait_for_service(timeout_sec=timeout_s):
        raise TimeoutError(f"service {client.srv_name} not available after {timeout_s:.0f} s")
    future = client.call_async(request)
    deadline = time.monotonic() + timeout_s
    while not future.done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"service {client.srv_name} did not answer in {timeout_s:.0f} s")
        time.sleep(0.01)
    return future.result()


def _write_gif(frames: list[np.ndarray], path: Path, every: int = 2) -> str | None:
    if not frames:
        return None
    from PIL import Image as PILImage

    images = [PILImage.fromarray(f) for f in frames[::every]]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=100 * every, loop=0)
    return str(path)


def run_episode(client: DemoClient, task: str, seed: int, timeout_s: float, gif_dir: Path | None) -> EpisodeResult:
    call_service(client.policy_stop, Stop.Request(reason=f"demo: next episode {task}"), 30.0)
    reset = call_service(client.sim_reset, Reset.Request(task=task, seed=seed), 60.0)
    if not reset.success:
        raise RuntimeError(f"sim reset to {task} failed: {reset.message}")
    call_service(client.controller_reset, Reset.Request(task="", seed=-1), 30.0)
    with client.lock:
        last_instruction_id = client.policy_status.instruction_id if client.policy_status else 0
        client.chunk_times.clear()
        client.command_times.clear()
        client.frames.clear()
        client.task_status = None
    client.record_frames = gif_dir is not None
    t0 = time.monotonic()
    client.instruction_pub.publish(String(data=reset.instruction))
    success_at = None
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.05)
        with client.lock:
            status = client.task_status
        if status is not None and status.success:
            success_at = time.monotonic() - t0
            time.sleep(0.5)  # a few more frames of the result for the GIF
            break
    client.record_frames = False
    with client.lock:
        chunks = [t for t, iid in client.chunk_times if iid > last_instruction_id]
        first_chunk = chunks[0] if chunks else None
        commands = [t for t in client.command_times if first_chunk is not None and t >= first_chunk]
        frames = list(client.frames)
    gif = _write_gif(frames, gif_dir / f"{task}.gif") if gif_dir is not None else None
    return EpisodeResult(
        task=task, seed=seed, instruction=reset.instruction, success=success_at is not None,
        time_to_success_s=success_at,
        first_chunk_ms=(first_chunk - t0) * 1e3 if first_chunk is not None else None,
        first_command_ms=(commands[0] - t0) * 1e3 if commands else None,
        gif=gif,
    )


def perception_ready(diagnostics: dict[str, str]) -> bool:
    """Perception's /diagnostics say its VLM is loaded and the policy's feature contract arrived."""
    return diagnostics.get("backbone_ready") == "True" and bool(diagnostics.get("contract_layers"))


def wait_until_ready(client: DemoClient, timeout_s: float) -> None:
    """Until the policy has a head, perception its VLM and contract, and the sim answers resets.

    Perception loads its VLM after the policy is up (seconds, more on a loaded machine): an
    instruction sent before that would wait for it and look like a slow or dead graph.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with client.lock:
            status, perception = client.policy_status, dict(client.perception)
        if (status is not None and status.state != PolicyStatus.STATE_ERROR and perception_ready(perception)
                and client.sim_reset.service_is_ready()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the graph was not ready after {timeout_s:.0f} s (policy status: "
                       f"{client.policy_status.message if client.policy_status else 'none'}; perception: "
                       f"{client.perception.get('message', 'no diagnostics')})")


def main(argv: list[str]) -> int:
    from m2vla_core.sim.tasks import task_names

    parser = argparse.ArgumentParser(prog="m2vla demo", description=__doc__.splitlines()[0])
    parser.add_argument("launch_args", nargs="*", help="extra bringup arguments, name:=value")
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the first episode")
    parser.add_argument("--timeout", type=float, default=45.0, help="[s] per episode")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="GIFs, JSON and node logs")
    parser.add_argument("--no-gif", action="store_true")
    opts = parser.parse_args(argv)
    tasks = task_names() if opts.tasks == "all" else [t.strip() for t in opts.tasks.split(",") if t.strip()]

    from m2vla_ros import graph

    try:
        args = graph.parse_arguments(["sim:=true", "rviz:=false", *opts.launch_args])
    except ValueError as exc:
        print(f"m2vla demo: {exc}", file=sys.stderr)
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)
    results: list[EpisodeResult] = []
    rclpy.init(args=[])  # our own argv is not ROS arguments
    client = DemoClient()
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    graph_procs = Graph(args, log_dir=opts.out / "logs")
    try:
        graph_procs.start()
        print(f"m2vla demo: graph started ({', '.join(n.name for n in graph_procs.nodes)}); logs in {opts.out / 'logs'}",
              flush=True)
        wait_until_ready(client, 180.0)
        for i, task in enumerate(tasks):
            result = run_episode(client, task, opts.seed + i, opts.timeout, None if opts.no_gif else opts.out)
            results.append(result)
            print(f"  {task:<14} {'SUCCESS' if result.success else 'fail   '} "
                  f"{(f'{result.time_to_success_s:5.1f} s' if result.success else '   -   ')}  "
                  f"first chunk {result.first_chunk_ms or float('nan'):6.0f} ms  "
                  f"first command {result.first_command_ms or float('nan'):6.0f} ms  \"{result.instruction}\"", flush=True)
            dead = graph_procs.dead()
            if dead:
                raise RuntimeError(f"node(s) died: {dead}; see {opts.out / 'logs'}")
    except (TimeoutError, RuntimeError) as exc:
        print(f"m2vla demo: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("m2vla demo: interrupted", file=sys.stderr)
    finally:
        graph_procs.stop()
        executor.shutdown(timeout_sec=1.0)
        spinner.join(timeout=2.0)  # a spin thread alive at interpreter exit aborts in C++ ("terminate called")
        client.destroy_node()
        rclpy.try_shutdown()
    summary = _summary(results)
    (opts.out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"m2vla demo: {summary['successes']}/{summary['episodes']} tasks succeeded; "
          f"instruction -> first command p50 {summary['first_command_p50_ms']} ms; wrote {opts.out / 'demo.json'}")
    return 0 if results and len(results) == len(tasks) else 1


def _summary(results: list[EpisodeResult]) -> dict:
    firsts = [r.first_command_ms for r in results if r.first_command_ms is not None]
    chunks = [r.first_chunk_ms for r in results if r.first_chunk_ms is not None]
    return {
        "episodes": len(results),
        "successes": sum(r.success for r in results),
        "mean_success": (sum(r.success for r in results) / len(results)) if results else 0.0,
        "first_chunk_p50_ms": round(statistics.median(chunks), 1) if chunks else None,
        "first_command_p50_ms": round(statistics.median(firsts), 1) if firsts else None,
        "results": [asdict(r) for r in results],
    }
