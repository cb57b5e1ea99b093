"""Measure the scripted experts and the renderer (a report, not a test).

    python -m m2vla_core.sim.bench --seeds 20 [--seed-offset 0] [--noise 0.0] [--render-frames 50]

Prints, per task: expert success over the seeds, mean episode length (control steps), wall time
per episode without rendering; then rendering frames/s at the default image size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from m2vla_core.sim.env import TaskEnv
from m2vla_core.sim.experts import ExpertConfig, run_expert_episode
from m2vla_core.sim.scene import SimConfig
from m2vla_core.sim.tasks import parse_task_list


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--noise", type=float, default=0.0, help="[rad] executed-action noise")
    parser.add_argument("--render-frames", type=int, default=50, help="0 skips the rendering measurement")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--renderer", default="tiny", choices=["auto", "egl", "tiny"])
    opts = parser.parse_args(argv)
    config = ExpertConfig(noise_std_rad=opts.noise)
    total_ok = total = 0
    with TaskEnv(SimConfig(render=False)) as env:
        print(f"{'task':<14} {'success':>9} {'steps':>6} {'s/episode':>10}  failed seeds")
        for task in parse_task_list(opts.tasks):
            ok, steps, failed = 0, [], []
            t0 = time.perf_counter()
            for seed in range(opts.seed_offset, opts.seed_offset + opts.seeds):
                success, n = run_expert_episode(env, task, seed, config)
                ok += success
                steps.append(n)
                if not success:
                    failed.append(seed)
            dt = (time.perf_counter() - t0) / opts.seeds
            total_ok, total = total_ok + ok, total + opts.seeds
            print(f"{task:<14} {ok:>4}/{opts.seeds:<4} {np.mean(steps):>6.1f} {dt:>10.2f}  {failed}")
    print(f"{'all':<14} {total_ok:>4}/{total:<4} ({100.0 * total_ok / total:.1f}%)")
    if opts.render_frames > 0:
        sim = SimConfig(image_width=opts.image_size, image_height=opts.image_size, renderer=opts.renderer)
        with TaskEnv(sim) as env:
            env.reset("stack", 0)
            env.scene.render()
            t0 = time.perf_counter()
            for _ in range(opts.render_frames):
                env.scene.render()
            dt = (time.perf_counter() - t0) / opts.render_frames
            print(f"render {opts.image_size}x{opts.image_size} ({env.renderer}): {dt * 1e3:.1f} ms/frame, "
                  f"{1.0 / dt:.1f} frames/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
