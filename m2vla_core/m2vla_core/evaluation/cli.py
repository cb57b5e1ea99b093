"""``m2vla eval``: closed-loop success of a head checkpoint in the PyBullet task suite.

Every task runs ``--episodes`` seeded episodes, seeds ``seed_offset .. seed_offset + N - 1``
(default offset 1000: ``m2vla record`` uses 0.. for training data, so evaluation layouts are
held out). With ``--workers`` > 1 episodes are spread over spawned processes, each with its
own env, backbone and head (one torch thread each); with 1 they run in this process at torch's
default thread count. Output: a per-task success table on stdout; with ``--json`` a JSON report
(``mean_success``, per-task success, seeds, act latency p50 / p99); with ``--out DIR`` that
report as eval.json, a PNG bar chart and one short GIF per task (unless ``--no-gif``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from m2vla_core.control.config import check_ensemble_chunks, check_ensemble_decay
from m2vla_core.evaluation.rollout import ENSEMBLE_CHUNKS, ENSEMBLE_DECAY, EXECUTE_STEPS, check_latency_steps
from m2vla_core.paths import check_destination

DEFAULT_SEED_OFFSET = 1000
MAX_WORKERS = 2  # this machine has 2 shared cores
GIF_SIZE_PX = 128


@dataclass(frozen=True)
class EvalConfig:
    policy: str = ""  # head checkpoint dir; "" = the shipped default policy
    backend: str = "onnxruntime"  # onnxruntime | torch
    backbone: str = ""  # backbone dir; "" = the shipped tiny backbone
    episodes: int = 10  # per task
    seed_offset: int = DEFAULT_SEED_OFFSET
    tasks: tuple[str, ...] = ()  # () = all tasks
    workers: int = 1
    max_steps: int = 200  # control steps per episode before it counts as a failure
    execute_steps: int = EXECUTE_STEPS  # chunk waypoints executed before re-planning (receding horizon)
    gif: bool = True  # keep frames of each task's first episode for a GIF
    privileged_error_m: float = 0.0  # [m] error put on a privileged-state head's object positions
    latency_steps: int = 0  # control steps from an observation to its chunk reaching the arm (RolloutConfig)
    ensemble_chunks: int = ENSEMBLE_CHUNKS  # follow the mean of the newest N chunks (RolloutConfig)
    ensemble_decay: float = ENSEMBLE_DECAY  # weighted exp(-decay * i), i = 0 the oldest (RolloutConfig)

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "torch"):
            raise ValueError(f"EvalConfig.backend must be onnxruntime or torch, got {self.backend!r}")
        if self.episodes < 1:
            raise ValueError(f"EvalConfig.episodes must be >= 1, got {self.episodes}")
        if self.seed_offset < 0:
            raise ValueError(f"EvalConfig.seed_offset must be >= 0, got {self.seed_offset}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"EvalConfig.workers must be in [1, {MAX_WORKERS}], got {self.workers}")
        if self.max_steps < 1 or self.execute_steps < 1:
            raise ValueError(f"EvalConfig.max_steps / execute_steps must be >= 1, got {self.max_steps}/{self.execute_steps}")
        if not (np.isfinite(self.privileged_error_m) and self.privileged_error_m >= 0.0):
            raise ValueError(f"EvalConfig.privileged_error_m must be finite and >= 0, got {self.privileged_error_m}")
        check_latency_steps(self.latency_steps, "EvalConfig")
        check_ensemble_chunks(self.ensemble_chunks, "EvalConfig")
        check_ensemble_decay(self.ensemble_decay, "EvalConfig")


@dataclass
class EvalReport:
    policy: str
    backend: str
    mean_success: float
    success: dict[str, float]  # task -> success rate
    episodes: dict[str, list[dict]]  # task -> [{seed, success, steps, instruction}]
    seeds: dict[str, list[int]]
    act_ms_p50: float  # agent.act(): backbone + head
    act_ms_p99: float
    head_us_p50: float  # head inference only
    head_us_p99: float
    backbone_ms_p50: float
    seconds: float
    config: dict = field(default_factory=dict)
    # [m] medians of a position-predicting head's belief vs the sim (empty for other heads):
    # cube_first_act (arm at home), cube_all_acts, target_all_acts
    object_error_m_p50: dict[str, float] = field(default_factory=dict)
    # where a privileged-state head's object positions came from: "localiser" (the camera, once
    # per episode), "simulator" (truth, a diagnostic), "" (a head that reads none)
    object_positions: str = ""
    localiser_ms_p50: float = float("nan")  # the localiser's one reading per episode
    # reason code -> chunks the ROS controller's checks refused (the arm held instead)
    refused_chunks: dict[str, int] = field(default_factory=dict)
    gifs: dict[str, list] = field(default_factory=dict)  # task -> frames (not serialised)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("gifs")
        return d


# ----------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(config: EvalConfig, threads: int | None = 1) -> None:
    """Build this process's env, backbone and head once (spawned workers, or in-process)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.sim import TaskEnv

    agent = VLAAgent.load(config.policy or None, backend=config.backend, backbone_path=config.backbone or None,
                          privileged_error_m=config.privileged_error_m)
    _WORKER.update(env=TaskEnv(agent.sim_config()), agent=agent, config=config)


def _run_job(job: tuple[str, int, bool]) -> dict:
    from m2vla_core.control.config import get_preset
    from m2vla_core.evaluation.rollout import RolloutConfig, run_episode

    task, seed, keep_frames = job
    env, agent, config = _WORKER["env"], _WORKER["agent"], _WORKER["config"]
    n_head = len(agent.head_ms)
    n_bb = len(agent.backbone_ms)
    n_obj = len(agent.object_errors_m)
    n_loc = len(agent.localiser_ms)
    rollout = RolloutConfig(max_steps=config.max_steps, execute_steps=config.execute_steps, keep_frames=keep_frames,
                            frame_every=2, controller=get_preset("panda"),  # the ROS controller's chunk checks
                            latency_steps=config.latency_steps, ensemble_chunks=config.ensemble_chunks,
                            ensemble_decay=config.ensemble_decay)
    outcome = run_episode(env, agent, task, seed, rollout)
    frames = [_small(f) for f in outcome.frames] if keep_frames else []
    return {"task": task, "seed": seed, "success": bool(outcome.success), "steps": outcome.steps,
            "refusals": list(outcome.refusals), "instruction": outcome.instruction, "act_ms": list(outcome.act_ms),
            "head_ms": agent.head_ms[n_head:],
            "backbone_ms": agent.backbone_ms[n_bb:], "object_error_m": agent.object_errors_m[n_obj:], "frames": frames,
            "localiser_ms": agent.localiser_ms[n_loc:],
            "object_positions": "localiser" if agent.localiser is not None else ("simulator" if agent.privileged else "")}


def _small(frame: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((GIF_SIZE_PX, GIF_SIZE_PX), Image.Resampling.BILINEAR))


# ----------------------------------------------------------------------------- driver
def _tasks_and_jobs(config: EvalConfig) -> tuple[list[str], list[tuple[str, int, bool]]]:
    """The validated task list and one (task, seed, keep_frames) job per episode."""
    from m2vla_core.sim.tasks import parse_task_list, task_names

    tasks = parse_task_list(",".join(list(config.tasks) or task_names()))
    jobs = [(task, config.seed_offset + i, config.gif and i == 0) for task in tasks for i in range(config.episodes)]
    return tasks, jobs


def evaluate(config: EvalConfig, *, progress: bool = True) -> EvalReport:
    """Roll out every (task, seed) and aggregate; workers > 1 uses spawned processes."""
    if config.workers == 1:
        _init_worker(config, threads=None)
        env, agent = _WORKER["env"], _WORKER["agent"]
        try:
            return evaluate_with(config, env, agent, progress=progress)
        finally:
            env.close()
    from tqdm import tqdm

    tasks, jobs = _tasks_and_jobs(config)
    t0 = time.perf_counter()
    results: list[dict] = []
    with tqdm(total=len(jobs), unit="ep", desc="eval", disable=not progress, dynamic_ncols=True) as bar, \
            ProcessPoolExecutor(max_workers=config.workers, mp_context=mp.get_context("spawn"),
                                initializer=_init_worker, initargs=(config, 1)) as pool:
        for result in pool.map(_run_job, jobs):
            results.append(result)
            bar.update(1)
            bar.set_postfix(ok=sum(r["success"] for r in results), refresh=False)
    return _aggregate(config, tasks, results, time.perf_counter() - t0)


def evaluate_with(config: EvalConfig, env, agent, *, progress: bool = True, after_episode=None) -> EvalReport:
    """In-process rollouts of every (task, seed) of ``config`` with a given env and agent (any
    ``reset`` / ``act`` agent: a pack set, the text baseline). ``after_episode(job)`` may return a
    dict kept per episode in ``report.config['episode_notes']``. The caller owns ``env``."""
    from tqdm import tqdm

    tasks, jobs = _tasks_and_jobs(config)
    t0 = time.perf_counter()
    results: list[dict] = []
    notes: list[dict] = []
    _WORKER.update(env=env, agent=agent, config=config)  # _run_job reads its env / agent from here
    try:
        with tqdm(total=len(jobs), unit="ep", desc="eval", disable=not progress, dynamic_ncols=True) as bar:
            for job in jobs:
                results.append(_run_job(job))
                if after_episode is not None:
                    notes.append({"task": job[0], "seed": job[1], **after_episode(job)})
                bar.update(1)
                bar.set_postfix(ok=sum(r["success"] for r in results), refresh=False)
    finally:
        _WORKER.clear()
    report = _aggregate(config, tasks, results, time.perf_counter() - t0)
    if after_episode is not None:
        report.config = {**report.config, "episode_notes": notes}
    return report


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _aggregate(config: EvalConfig, tasks: list[str], results: list[dict], seconds: float) -> EvalReport:
    from m2vla_core.assets_paths import default_policy_path

    by_task = {t: [r for r in results if r["task"] == t] for t in tasks}
    success = {t: float(np.mean([r["success"] for r in rs])) for t, rs in by_task.items()}
    act = [x for r in results for x in r["act_ms"]]
    head = [x for r in results for x in r["head_ms"]]
    bb = [x for r in results for x in r["backbone_ms"]]
    errors = [r.get("object_error_m") or [] for r in results]  # per episode: [(cube, target)] per act
    object_error = {}
    if any(errors):
        object_error = {"cube_first_act": _pct([e[0][0] for e in errors if e], 50),
                        "cube_all_acts": _pct([a[0] for e in errors for a in e], 50),
                        "target_all_acts": _pct([a[1] for e in errors for a in e], 50)}
    return EvalReport(
        policy=config.policy or str(default_policy_path()), backend=config.backend,
        mean_success=float(np.mean(list(success.values()))), success=success,
        episodes={t: [{**{k: r[k] for k in ("seed", "success", "steps", "instruction")},
                       "refused_chunks": len(r.get("refusals", [])),
                       **({"object_error_m_first_act": list(r["object_error_m"][0])} if r.get("object_error_m") else {})}
                      for r in rs] for t, rs in by_task.items()},
        seeds={t: [r["seed"] for r in rs] for t, rs in by_task.items()},
        act_ms_p50=_pct(act, 50), act_ms_p99=_pct(act, 99), head_us_p50=_pct(head, 50) * 1e3,
        head_us_p99=_pct(head, 99) * 1e3, backbone_ms_p50=_pct(bb, 50), seconds=seconds, config=asdict(config),
        gifs={r["task"]: r["frames"] for r in results if r["frames"]}, object_error_m_p50=object_error,
        object_positions=results[0].get("object_positions", "") if results else "",
        localiser_ms_p50=_pct([x for r in results for x in r.get("localiser_ms", [])], 50),
        refused_chunks=dict(Counter(code for r in results for code in r.get("refusals", []))))


def format_table(report: EvalReport) -> str:
    lines = [f"{'task':<16}{'success':>9}{'episodes':>10}", "-" * 35]
    for task, rate in report.success.items():
        lines.append(f"{task:<16}{rate * 100:>8.0f}%{len(report.episodes[task]):>10}")
    lines.append("-" * 35)
    lines.append(f"{'mean':<16}{report.mean_success * 100:>8.1f}%")
    lines.append(f"act latency p50 {report.act_ms_p50:.1f} ms, p99 {report.act_ms_p99:.1f} ms "
                 f"(head p50 {report.head_us_p50:.0f} us, backbone p50 {report.backbone_ms_p50:.1f} ms)")
    if "execute_steps" in report.config:  # success depends on it (docs/results.md, "Re-planning less often")
        lines.append(f"re-planned every {report.config['execute_steps']} waypoints of each chunk")
    if report.config.get("ensemble_chunks", 1) > 1:
        decay = report.config.get("ensemble_decay", 0.0)
        lines.append(f"each step followed the mean of the newest {report.config['ensemble_chunks']} chunks covering it"
                     + (f", weighted exp(-{decay:g} i) from the oldest" if decay else ""))
    latency_steps = report.config.get("latency_steps", 0)
    if latency_steps:
        lines.append(f"latency: each chunk reached the arm {latency_steps} control steps after its observation "
                     f"and ran from its waypoint {latency_steps}")
    if report.refused_chunks:
        lines.append("chunks the controller refuses (the arm held instead): "
                     + ", ".join(f"{n} {code}" for code, n in sorted(report.refused_chunks.items())))
    if report.object_positions == "localiser":
        lines.append(f"object positions read once per episode by the localiser, p50 {report.localiser_ms_p50:.1f} ms")
    if report.object_error_m_p50:
        e = report.object_error_m_p50
        lines.append(f"where the head (or its localiser) believes the objects are, error p50: cube {e['cube_first_act'] * 100:.1f} cm "
                     f"at the first act, {e['cube_all_acts'] * 100:.1f} cm over all acts; target "
                     f"{e['target_all_acts'] * 100:.1f} cm")
    return "\n".join(lines)


def plot_success(success: dict[str, float], path: str | os.PathLike, title: str = "success rate") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    names = list(success)
    ax.bar(names, [success[n] * 100 for n in names], color="#4c72b0")
    ax.set_ylim(0, 100)
    ax.set_ylabel("success [%]")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_gif(frames: list[np.ndarray], path: str | os.PathLike, frame_dt_s: float = 0.2) -> None:
    from PIL import Image

    if not frames:
        return
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(frame_dt_s * 1e3), loop=0)


def write_outputs(report: EvalReport, out_dir: str | os.PathLike | None, json_path: str | os.PathLike | None) -> None:
    payload = json.dumps(report.to_json(), indent=2) + "\n"
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(payload, encoding="utf-8")
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(payload, encoding="utf-8")
        plot_success(report.success, out / "success.png",
                     title=f"{Path(report.policy).name}: mean {report.mean_success * 100:.1f}%")
        for task, frames in report.gifs.items():
            save_gif(frames, out / f"{task}.gif")


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="m2vla eval", description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="", help="head checkpoint dir (default: the shipped policy)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--backbone", default="", help="backbone dir (default: the shipped tiny backbone)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed-offset", type=int, default=DEFAULT_SEED_OFFSET,
                   help="first seed of every task (training data uses 0..; keep them disjoint)")
    p.add_argument("--tasks", default="all", help="'all' or comma-separated task names")
    p.add_argument("--workers", type=int, default=1, help=f"worker processes (1..{MAX_WORKERS})")
    p.add_argument("--max-steps", type=int, default=200, help="control steps per episode")
    p.add_argument("--execute-steps", type=int, default=EXECUTE_STEPS,
                   help="chunk waypoints executed before re-planning (default: the ROS graph's cadence)")
    p.add_argument("--ensemble-chunks", type=int, default=ENSEMBLE_CHUNKS,
                   help="follow the mean of the newest N chunks that cover each step (temporal ensembling; default: "
                        "the ROS controller's ensemble_chunks)")
    p.add_argument("--ensemble-decay", type=float, default=ENSEMBLE_DECAY,
                   help="weigh those chunks exp(-decay * i), i = 0 for the oldest (0 = equal weights; default: the "
                        "ROS controller's ensemble_decay)")
    p.add_argument("--privileged-error-cm", type=float, default=0.0,
                   help="a privileged-state head sees each named object this far from the truth (direction per episode)")
    p.add_argument("--latency-steps", type=int, default=0,
                   help="emulate the ROS graph's latency: a chunk reaches the arm this many control steps after "
                        "its observation and runs from that waypoint (needs latency + execute steps <= chunk length)")
    p.add_argument("--json", default="", help="write the JSON report here")
    p.add_argument("--out", default="", help="directory for eval.json, success.png and one GIF per task")
    p.add_argument("--no-gif", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from m2vla_core.sim.tasks import parse_task_list

        config = EvalConfig(policy=args.policy, backend=args.backend, backbone=args.backbone, episodes=args.episodes,
                            seed_offset=args.seed_offset, tasks=tuple(parse_task_list(args.tasks)),
                            workers=args.workers, max_steps=args.max_steps, execute_steps=args.execute_steps,
                            gif=not args.no_gif and bool(args.out),
                            privileged_error_m=args.privileged_error_cm / 100.0, latency_steps=args.latency_steps,
                            ensemble_chunks=args.ensemble_chunks, ensemble_decay=args.ensemble_decay)
        if args.json:
            check_destination(args.json, "--json", directory=False)
        if args.out:
            check_destination(args.out, "--out", directory=True)
        report = evaluate(config, progress=not args.no_progress)
        write_outputs(report, args.out or None, args.json or None)
    except (ValueError, KeyError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"m2vla eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0
