"""``m2vla record``: run the scripted experts and write a LeRobot v2.1 dataset.

Seeds: for each task, episodes use consecutive seeds starting at ``--seed-offset``; a failed
expert episode is dropped (unless ``--keep-failures``) and the next seed is tried, up to twice
the requested count. Keep evaluation seeds disjoint by giving ``m2vla eval`` a different offset;
the seeds used are written to ``meta/info.json`` under ``"m2vla"``.

One frame per control step (``--control-dt``, default 0.1 s = 10 fps): chunk policies act at the
control rate, and rendering is what a recording costs.

With ``--noise X`` the executed arm targets get Gaussian noise of std X rad (recovery data);
the stored ``action`` is always the clean expert target for the observed state. With
``--repeats K`` every layout (seed) is demonstrated K times, each with its own noise sequence:
many perturbed demonstrations of few layouts (e.g. the graph-test policy that must solve one
layout per task, scripts/make_graph_test_policy.sh). ``--episodes-per-task`` counts layouts;
a layout counts when at least one of its repeats succeeded.

With ``--policy CKPT`` the episodes are takeover data (DAgger-style,
``m2vla_core.evaluation.takeover``): the policy drives each layout for a random number of
control steps (``--takeover-steps MIN:MAX``), then the expert finishes from there, and only the
expert's part is written. A layout the policy finishes before its takeover is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2vla_core.paths import check_destination
from m2vla_core.sim.env import TaskEnv
from m2vla_core.sim.experts import ExpertConfig, run_expert_episode
from m2vla_core.sim.lerobot_io import Episode, FeatureNames, LeRobotWriter
from m2vla_core.sim.scene import SimConfig
from m2vla_core.sim.tasks import parse_task_list


@dataclass(frozen=True)
class RecordConfig:
    out: str
    tasks: tuple[str, ...]
    episodes_per_task: int = 20
    seed_offset: int = 0
    noise_std_rad: float = 0.0
    keep_failures: bool = False
    repeats: int = 1  # recordings per seed, noise streams 0..repeats-1
    max_attempts_factor: int = 2  # try at most factor * episodes_per_task seeds per task
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.episodes_per_task < 1:
            raise ValueError(f"RecordConfig.episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.seed_offset < 0:
            raise ValueError(f"RecordConfig.seed_offset must be >= 0, got {self.seed_offset}")
        if self.repeats < 1:
            raise ValueError(f"RecordConfig.repeats must be >= 1, got {self.repeats}")
        if self.max_attempts_factor < 1:
            raise ValueError(f"RecordConfig.max_attempts_factor must be >= 1, got {self.max_attempts_factor}")
        if not self.tasks:
            raise ValueError("RecordConfig.tasks must name at least one task")
        ExpertConfig(noise_std_rad=self.noise_std_rad)  # validates the noise range


@dataclass
class RecordSummary:
    episodes: int
    frames: int
    attempts: dict[str, int]
    kept: dict[str, int]
    successes: dict[str, int]
    seconds: float
    renderer: str


class EpisodeCollector:
    """``on_step`` callback of ``drive_expert``: collects (observation, clean action) pairs; the
    final observation, which no action follows, is dropped."""

    def __init__(self) -> None:
        self.images, self.wrists, self.states, self.actions, self.ee, self.times = [], [], [], [], [], []

    def __call__(self, obs, action, executed) -> None:
        if action is None:
            return
        self.images.append(obs.image)
        if obs.wrist_image is not None:
            self.wrists.append(obs.wrist_image)
        self.states.append(obs.joint_positions)
        self.actions.append(action)
        self.ee.append(obs.ee_pose)
        self.times.append(obs.time_s)

    def episode(self, env, task: str, seed: int, success: bool) -> Episode:
        times = np.asarray(self.times, dtype=np.float32)
        return Episode(instruction=env.spec.instruction, frames=np.stack(self.images),  # (T, H, W, 3)
                       states=np.asarray(self.states, dtype=np.float32),
                       actions=np.asarray(self.actions, dtype=np.float32), fps=1.0 / env.config.control_dt_s,
                       task=task, seed=int(seed), success=bool(success),
                       wrist_frames=np.stack(self.wrists) if self.wrists else None,
                       ee_poses=np.asarray(self.ee, dtype=np.float32),
                       timestamps=times - times[0] if len(times) else times)  # LeRobot: from 0 in each episode


def record_episode(env: TaskEnv, task: str, seed: int, expert_config: ExpertConfig) -> Episode:
    """Run the expert once and collect (observation, clean action) pairs; the final state is dropped."""
    collector = EpisodeCollector()
    success, _ = run_expert_episode(env, task, seed, expert_config, on_step=collector)
    return collector.episode(env, task, seed, success)


def record_dataset(config: RecordConfig, sim: SimConfig | None = None, names: FeatureNames | None = None,
                   progress: bool = True, source=None, extra_info: dict | None = None) -> RecordSummary:
    """``source(env, task, seed, expert_config) -> Episode | None`` makes each episode (default
    ``record_episode``; None: nothing to record for that seed, e.g. a takeover policy that finished
    the task itself); ``extra_info`` is added to info.json's "m2vla" record.

    An interrupted recording keeps its finished episodes readable: info.json is rewritten after
    every episode with them, the seeds they came from and ``"interrupted": true`` (false once all
    tasks are done), so this holds after a Ctrl-C, an error or a kill the process cannot catch."""
    from tqdm import tqdm

    source = source or record_episode

    sim = sim or SimConfig()
    if not sim.render:
        raise ValueError("recording needs images: SimConfig.render must be True")
    out = Path(config.out)
    check_destination(out, "out", directory=True)  # refused before the simulator starts
    env = TaskEnv(sim)
    t0 = time.perf_counter()
    extra = {"sim_config": dataclasses.asdict(sim), "renderer": env.renderer, "expert_noise_std_rad":
             config.noise_std_rad, "repeats_per_seed": config.repeats, "seed_offset": config.seed_offset,
             "state_layout": list(env.state_names), "action_layout": list(env.state_names), "seeds": {},
             "interrupted": True, **(extra_info or {})}  # until the last task is done
    writer = LeRobotWriter(config.out, fps=1.0 / sim.control_dt_s, image_shape=(sim.image_height, sim.image_width, 3),
                           state_names=list(env.state_names), action_names=list(env.state_names), names=names,
                           wrist_image=sim.wrist_camera, extra_info=extra, overwrite=config.overwrite)
    summary = RecordSummary(0, 0, {}, {}, {}, 0.0, env.renderer)
    bar = tqdm(total=len(config.tasks) * config.episodes_per_task * config.repeats, unit="ep",
               disable=not progress, desc="record", dynamic_ncols=True)
    try:
        for task in config.tasks:
            kept = attempts = successes = 0
            writer.extra_info["seeds"][task] = []  # listed even if none is kept; the writer fills it
            while kept < config.episodes_per_task and attempts < config.max_attempts_factor * config.episodes_per_task:
                seed = config.seed_offset + attempts
                attempts += 1
                written = 0
                for stream in range(config.repeats):
                    expert_config = ExpertConfig(noise_std_rad=config.noise_std_rad, noise_stream=stream)
                    episode = source(env, task, seed, expert_config)
                    if episode is None:
                        continue
                    successes += int(bool(episode.success))
                    if episode.success or config.keep_failures:
                        writer.add_episode(episode)
                        written += 1
                        summary.frames += len(episode)
                        summary.episodes += 1
                        bar.update(1)
                    bar.set_postfix(task=task, ok=f"{successes}/{attempts * config.repeats}")
                kept += int(written > 0)
            summary.attempts[task] = attempts * config.repeats  # expert runs
            summary.kept[task], summary.successes[task] = kept, successes
        writer.extra_info["interrupted"] = False
    finally:
        bar.close()
        writer.close()  # over the episodes on disk, including one committed as a Ctrl-C came
        env.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m2vla record", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument("--tasks", default="all", help="'all' or comma-separated task names")
    parser.add_argument("--episodes-per-task", type=int, default=20)
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed of every task")
    parser.add_argument("--noise", type=float, default=0.0, help="[rad] std of noise on executed arm targets")
    parser.add_argument("--repeats", type=int, default=1,
                        help="demonstrations per seed, each with its own noise sequence (use with --noise)")
    parser.add_argument("--keep-failures", action="store_true", help="also keep episodes the expert failed")
    parser.add_argument("--image-size", type=int, help="[px] square camera image (default 224; with --policy the "
                        "policy's own)")
    parser.add_argument("--control-dt", type=float, default=0.1, help="[s] control period = 1 / fps")
    parser.add_argument("--wrist", action="store_true", help="also record the wrist camera")
    parser.add_argument("--renderer", default="tiny", choices=["auto", "egl", "tiny"],
                        help="tiny: portable, identical images everywhere (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    parser.add_argument("--policy", help="takeover data (DAgger-style): this policy checkpoint ('default': the "
                        "shipped one) drives each layout for a random number of steps, then the expert finishes "
                        "from there; only the expert's part is recorded")
    parser.add_argument("--takeover-steps", help="with --policy: MIN:MAX control steps the policy drives (drawn per "
                        "layout from its seed; default 10:70)")
    parser.add_argument("--no-progress", action="store_true")
    opts = parser.parse_args(argv)
    takeover = None
    try:
        tasks = tuple(parse_task_list(opts.tasks))
        config = RecordConfig(out=str(opts.out), tasks=tasks, episodes_per_task=opts.episodes_per_task,
                              seed_offset=opts.seed_offset, noise_std_rad=opts.noise, keep_failures=opts.keep_failures,
                              repeats=opts.repeats, overwrite=opts.overwrite)
        sim = SimConfig(image_width=opts.image_size or 224, image_height=opts.image_size or 224,
                        control_dt_s=opts.control_dt, wrist_camera=opts.wrist, renderer=opts.renderer)
        if opts.takeover_steps and not opts.policy:
            raise ValueError("--takeover-steps needs --policy (the policy that drives before the expert takes over)")
        if opts.policy:
            from m2vla_core.evaluation.takeover import TakeoverSource

            check_destination(opts.out, "--out", directory=True)  # before the policy loads
            takeover = TakeoverSource.load(opts.policy, opts.takeover_steps or "10:70")
            sim = takeover.sim_config(sim, image_size=opts.image_size)
        summary = record_dataset(config, sim, progress=not opts.no_progress, source=takeover,
                                 extra_info=takeover.info() if takeover else None)
    except (KeyError, ValueError, OSError) as exc:
        print(f"m2vla record: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary.episodes} episodes, {summary.frames} frames to {opts.out} in {summary.seconds:.1f} s "
          f"(renderer: {summary.renderer})")
    for task in config.tasks:
        solved = takeover.solved.get(task, 0) if takeover else 0  # layouts the expert never drove
        policy_note = f"  (the policy finished {solved} more itself)" if takeover else ""
        print(f"  {task:<14} kept {summary.kept[task]:>3}  expert success {summary.successes[task]}/"
              f"{summary.attempts[task] - solved}{policy_note}")
    short = [t for t in config.tasks if summary.kept[t] < config.episodes_per_task]
    if short:
        print(f"m2vla record: fewer episodes than asked for {', '.join(short)}", file=sys.stderr)
        return 1
    return 0
