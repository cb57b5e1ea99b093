"""``m2vla text-baseline {train,eval,probe}``: the VLM2VLA-style actions-as-text baseline.

  m2vla text-baseline train --data LEROBOT --out DIR [--steps 300] [--batch-size 8] [--tasks ...]
  m2vla text-baseline eval  --policy DIR [--tasks ...] [--episodes 5] [--json FILE]
  m2vla text-baseline probe --policy DIR [--head-steps 20] [--json FILE]
  m2vla text-baseline latency --policy DIR --head CKPT --data LEROBOT [--frames 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from pathlib import Path


def _write_json(payload: dict, path: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _train(args) -> int:
    import torch

    from m2vla_core.baselines.configuration_text_policy import LoraSettings, TextTrainConfig

    torch.set_num_threads(args.threads)
    from m2vla_core.baselines.text_policy import train_text_policy
    from m2vla_core.sim.tasks import parse_task_list

    cfg = TextTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, chunk_len=args.chunk_len, seed=args.seed)
    tasks = parse_task_list(args.tasks) if args.tasks else None
    r = train_text_policy(args.data, args.out, cfg, lora=LoraSettings(rank=args.rank), tasks=tasks,
                          progress=not args.no_progress)
    k = max(1, len(r.losses) // 10)
    payload = {"out": args.out, "steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": r.seconds,
               "trainable_params": r.trainable_params, "total_params": r.total_params,
               "loss_first": float(sum(r.losses[:k]) / k), "loss_last": float(sum(r.losses[-k:]) / k), "losses": r.losses}
    _write_json(payload, args.json or str(Path(args.out) / "train_text.json"))
    print(f"LoRA text policy: {r.trainable_params:,} trainable of {r.total_params:,} params, {cfg.steps} steps in "
          f"{r.seconds:.0f} s, loss {payload['loss_first']:.3f} -> {payload['loss_last']:.3f}; saved {args.out}")
    return 0


def _eval(args) -> int:
    import numpy as np
    import torch

    from m2vla_core.baselines.text_policy import TextActionPolicy, TextAgent
    from m2vla_core.evaluation.cli import EvalConfig, format_table
    from m2vla_core.packs.evaluation import evaluate_agent
    from m2vla_core.sim import SimConfig, TaskEnv
    from m2vla_core.sim.tasks import parse_task_list

    torch.set_num_threads(args.threads)
    policy = TextActionPolicy.load(args.policy)
    agent = TextAgent(policy)
    config = EvalConfig(policy=args.policy, backend="torch", episodes=args.episodes, seed_offset=args.seed_offset,
                        tasks=tuple(parse_task_list(args.tasks)), max_steps=args.max_steps,
                        execute_steps=policy.config.codec.chunk_len, gif=False)
    with TaskEnv(SimConfig(control_dt_s=policy.config.dt_s)) as env:
        report = evaluate_agent(config, agent, env, progress=not args.no_progress)
    out = report.to_json()
    out["text_policy"] = {"trainable_params": policy.trainable_parameters(), "chunks": agent.chunks,
                          "malformed_replies": agent.malformed, "tokens_per_chunk_mean": float(np.mean(agent.tokens)),
                          "chunk_ms_p50": float(np.percentile(agent.head_ms, 50)),
                          "chunk_ms_p99": float(np.percentile(agent.head_ms, 99)), "threads": args.threads}
    _write_json(out, args.json)
    print(format_table(report))
    tp = out["text_policy"]
    print(f"text policy: {tp['malformed_replies']}/{tp['chunks']} malformed replies, {tp['tokens_per_chunk_mean']:.0f} "
          f"tokens/chunk, chunk p50 {tp['chunk_ms_p50']:.0f} ms")
    return 0


def _probe(args) -> int:
    from m2vla_core.baselines.probe import frozen_backbone_probe, lora_probe
    from m2vla_core.baselines.text_policy import TextActionPolicy

    result = {"frozen_mol_path": frozen_backbone_probe(args.head_steps)}
    if args.policy:
        result["lora"] = lora_probe(TextActionPolicy.load(args.policy))
    _write_json(result, args.json)
    print(json.dumps(result, indent=2))
    return 0


def _latency(args) -> int:
    import torch

    from m2vla_core.baselines.text_policy import TextActionPolicy, latency_comparison, load_samples

    torch.set_num_threads(args.threads)
    policy = TextActionPolicy.load(args.policy)
    samples = load_samples(args.data, policy.config.codec.chunk_len)
    picks = np.linspace(0, len(samples) - 1, args.frames + 1).astype(int)
    result = latency_comparison(policy, args.head, [samples[i][:3] for i in picks])
    result["threads"] = args.threads
    _write_json(result, args.json)
    print(json.dumps(result, indent=2))
    return 0


def text_baseline_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="m2vla text-baseline", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="LoRA-only fine-tuning on a LeRobot dataset (CPU: keep it short)")
    t.add_argument("--data", required=True, help="LeRobot dataset (m2vla record)")
    t.add_argument("--out", required=True)
    t.add_argument("--tasks", default="")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--rank", type=int, default=8, help="LoRA rank")
    t.add_argument("--chunk-len", type=int, default=4, help="waypoints written per chunk")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads (cores here are shared)")
    t.add_argument("--json", default="")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="closed-loop success + latency per chunk in the sim suite")
    e.add_argument("--policy", required=True)
    e.add_argument("--tasks", default="all")
    e.add_argument("--episodes", type=int, default=5)
    e.add_argument("--seed-offset", type=int, default=1000)
    e.add_argument("--max-steps", type=int, default=200)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--json", default="")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_eval)
    r = sub.add_parser("probe", help="text-only next-token probe: frozen MoL path vs LoRA")
    r.add_argument("--policy", default="", help="trained text policy dir (adds the LoRA comparison)")
    r.add_argument("--head-steps", type=int, default=20)
    r.add_argument("--json", default="")
    r.set_defaults(func=_probe)
    lat = sub.add_parser("latency", help="per-chunk latency: text policy vs backbone + MoL+MSM head, same frames")
    lat.add_argument("--policy", required=True)
    lat.add_argument("--head", required=True, help="MoL+MSM head checkpoint (with model.onnx)")
    lat.add_argument("--data", required=True, help="LeRobot dataset to take frames from")
    lat.add_argument("--frames", type=int, default=10)
    lat.add_argument("--threads", type=int, default=1)
    lat.add_argument("--json", default="")
    lat.set_defaults(func=_latency)
    args = p.parse_args(argv)
    from m2vla_core.config_io import ConfigError
    from m2vla_core.heads.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, KeyError) as exc:
        print(f"m2vla text-baseline {args.cmd}: {exc}", file=sys.stderr)
        return 2
