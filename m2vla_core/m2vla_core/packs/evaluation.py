"""Measure packs in the sim suite with the ``m2vla eval`` machinery.

- ``evaluate_packed``: closed-loop success of a pack set (router on, or a pack forced per
  task) using ``evaluation.cli``'s job runner and aggregation, with a ``VLAAgent`` around
  ``PackedPolicy`` (it has ``HeadPolicy``'s interface). A refused route makes ``act`` return
  None, which the rollout treats as a failed episode in which the robot never moves.
- ``router_accuracy``: route the first observation of held-out seeds (default 1000..) and
  compare with the pack that lists the episode's task; no rollout needed, so it is cheap to
  run on many seeds.
"""

from __future__ import annotations

import os
import time

import numpy as np


class _TaskAwareEnv:
    """Env wrapper that forces the pack of the episode's task on reset (the 'task is named' mode)."""

    def __init__(self, env, policy) -> None:
        self.env, self.policy = env, policy

    def reset(self, task: str, seed: int):
        name = self.policy.pack_for_task(task)
        if not name:
            raise KeyError(f"no pack in this set covers task {task!r}")
        self.policy.force_pack(name)
        return self.env.reset(task, seed)

    def __getattr__(self, item):
        return getattr(self.env, item)


def evaluate_agent(config, agent, env, *, progress: bool = True, after_episode=None):
    """``evaluation.cli.evaluate_with``: in-process rollouts of ``config`` with this agent and env."""
    from m2vla_core.evaluation.cli import evaluate_with

    return evaluate_with(config, env, agent, progress=progress, after_episode=after_episode)


def evaluate_packed(config, *, force_by_task: bool = False, progress: bool = True, backbone=None):
    """Like ``evaluation.cli.evaluate`` (in-process, one worker) for a pack set or a head.

    ``force_by_task``: skip the router and use the pack that lists each episode's task
    (each pack alone on its tasks). The routed pack, confidence and any refusal of every
    episode are kept in ``report.config['episode_notes']``.
    """
    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.sim import TaskEnv

    agent = VLAAgent.load(config.policy, backend=config.backend, backbone_path=config.backbone or None, backbone=backbone)
    env = TaskEnv(agent.sim_config())
    run_env = _TaskAwareEnv(env, agent.policy) if force_by_task else env

    def note(job) -> dict:
        p = agent.policy
        return {"pack": getattr(p, "routed_pack", ""), "confidence": float(getattr(p, "route_confidence", 1.0)),
                "refusal": getattr(p, "refusal_reason", "")}

    try:
        report = evaluate_agent(config, agent, run_env, progress=progress, after_episode=note)
    finally:
        env.close()
    report.config["force_by_task"] = force_by_task
    return report


def router_accuracy(policy_path: str | os.PathLike, tasks=None, *, episodes: int = 50, seed_offset: int = 1000,
                    backbone=None, progress: bool = True) -> dict:
    """Route the first observation of ``episodes`` held-out seeds per task; -> accuracy / refusal summary.

    A task no pack lists counts as 'should refuse': correct when the policy refuses it.
    """
    if episodes < 1:  # before the pack set and its backbone load
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    from tqdm import tqdm

    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.packs.packed_policy import PackedPolicy
    from m2vla_core.sim import TaskEnv
    from m2vla_core.sim.tasks import task_names

    agent = VLAAgent.around(PackedPolicy.load(policy_path, backend="torch"), backbone=backbone)
    policy, backbone = agent.policy, agent.backbone
    covered = [t for info in policy.pack_infos.values() for t in info.tasks]
    tasks = list(tasks or covered)
    per_task: dict[str, dict] = {}
    confusion: dict[str, dict[str, int]] = {}
    latencies = []
    bar = tqdm(total=len(tasks) * episodes, unit="ep", desc="route", disable=not progress, dynamic_ncols=True)
    with TaskEnv(agent.sim_config()) as env:
        for task in tasks:
            want = policy.pack_for_task(task)
            right = routed_right = refused = 0
            row = confusion.setdefault(task, {})
            for i in range(episodes):
                obs = env.reset(task, seed_offset + i)
                hidden, mask = backbone.extract(obs.image, obs.instruction, policy.config.contract).numpy()
                t0 = time.perf_counter()
                decision = policy.decide(hidden, mask)
                latencies.append((time.perf_counter() - t0) * 1e6)
                name, refuse = decision.pack, bool(decision.refusal)
                refused += refuse
                routed_right += name == want
                right += (refuse and not want) or (not refuse and name == want)
                key = "refused" if refuse else name
                row[key] = row.get(key, 0) + 1
                bar.update(1)
            per_task[task] = {"pack": want, "accuracy": routed_right / episodes, "correct_decision": right / episodes,
                              "refusal_rate": refused / episodes}
    bar.close()
    covered_tasks = [t for t in tasks if per_task[t]["pack"]]
    return {"policy": str(policy_path), "episodes_per_task": episodes, "seed_offset": seed_offset,
            "min_confidence": policy.min_confidence, "min_instruction_similarity": policy.min_instruction_similarity,
            "accuracy": float(np.mean([per_task[t]["accuracy"] for t in covered_tasks])) if covered_tasks else float("nan"),
            "refusal_rate_covered": float(np.mean([per_task[t]["refusal_rate"] for t in covered_tasks])) if covered_tasks
            else float("nan"), "per_task": per_task, "confusion": confusion,
            "route_us_p50": float(np.percentile(latencies, 50)), "route_us_p99": float(np.percentile(latencies, 99))}


def offline_action_error(policy_path: str | os.PathLike, data: str | os.PathLike, *, tasks=None,
                         episodes: tuple[int, ...] | None = None, backend: str = "torch", max_per_episode: int = 0) -> dict:
    """Per-task mean squared action error [rad^2] of a policy on dataset frames (routed once per episode).

    Samples of one episode are fed in order after a reset, as in closed loop, so a pack set is
    routed on the episode's first frame. Use episodes none of the packs trained on.
    """
    from pathlib import Path

    from m2vla_core.export.runtime import HeadPolicy
    from m2vla_core.packs.configuration_packs import PACK_SET_NAME
    from m2vla_core.packs.packed_policy import PackedPolicy
    from m2vla_core.training.feature_dataset import FeatureDataset

    path = Path(policy_path)
    policy = (PackedPolicy.load(path, backend=backend) if (path / PACK_SET_NAME).is_file()
              else HeadPolicy.load(path, backend=backend))
    ds = data if isinstance(data, FeatureDataset) else FeatureDataset(data)
    names = list(ds.meta.task_names)
    keep_tasks = set(tasks or names)
    errors: dict[str, list[float]] = {}
    refused: dict[str, int] = {}
    eps = np.unique(ds.episode_index) if episodes is None else np.asarray(episodes)
    for ep in eps:
        rows = np.nonzero(ds.episode_index == ep)[0]
        task = names[int(ds.task_index[rows[0]])]
        if task not in keep_tasks:
            continue
        if max_per_episode:
            rows = rows[:max_per_episode]
        policy.reset()
        b = ds.batch(rows)
        for j in range(len(rows)):
            chunk = policy.infer(b["hidden"][j].numpy(), b["mask"][j].numpy(), b["state"][j].numpy())
            if chunk is None:
                refused[task] = refused.get(task, 0) + 1
                break
            errors.setdefault(task, []).append(float(np.mean((chunk - b["actions"][j].numpy()) ** 2)))
    return {"policy": str(policy_path), "mse": {t: float(np.mean(v)) for t, v in errors.items()},
            "refused_episodes": refused}

