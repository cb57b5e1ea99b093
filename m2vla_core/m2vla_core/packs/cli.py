"""``m2vla pack {train,combine,eval,route}``: skill packs and the task router.

  m2vla pack train   --data FEAT --tasks reach_above --name reach --out PACK [--config PRESET|JSON] [--steps N]
  m2vla pack combine --packs PACK1,PACK2 --out SET [--min-confidence 0.8] [--min-instruction-similarity auto]
  m2vla pack eval    --policy SET|CKPT [--by-task] [--episodes N] [--tasks ...] [--json FILE]
  m2vla pack route   --policy SET [--episodes 50] [--tasks ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def _write_json(payload: dict, path: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _train(args) -> int:
    from m2vla_core.packs.pack import train_pack
    from m2vla_core.sim.tasks import parse_task_list
    from m2vla_core.training.cli import resolve_run_config

    run = resolve_run_config(args.config)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    if overrides:
        run = replace(run, train=replace(run.train, **overrides))
    info = train_pack(args.data, args.out, args.name, parse_task_list(args.tasks), run, work_dir=args.work or None,
                      frames_per_episode=args.router_frames, export=not args.no_export, progress=not args.no_progress)
    print(f"pack {info.name!r}: tasks {list(info.tasks)}, {info.num_episodes} episodes, {info.num_samples} samples -> {args.out}")
    return 0


def _similarity(text: str) -> str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return text


def _combine(args) -> int:
    from m2vla_core.packs.configuration_packs import RouterTrainConfig
    from m2vla_core.packs.packed_policy import combine_packs

    similarity = None if args.min_instruction_similarity == "auto" else float(args.min_instruction_similarity)
    rep = combine_packs([p for p in args.packs.split(",") if p], args.out, min_confidence=args.min_confidence,
                        min_instruction_similarity=similarity, router_train=RouterTrainConfig(steps=args.router_steps),
                        overwrite=args.overwrite)
    print(f"pack set {rep.out}: packs {dict(rep.packs)}; router {rep.router_parameters} params, "
          f"{rep.num_examples} examples, held-out-episode accuracy {rep.router_val_accuracy:.3f}; "
          f"{rep.num_instructions} training instructions, refuses below similarity {rep.min_instruction_similarity:.3f}")
    _write_json({"out": str(rep.out), "packs": {k: list(v) for k, v in rep.packs.items()},
                 "router_val_accuracy": rep.router_val_accuracy, "router_train_accuracy": rep.router_train_accuracy,
                 "router_parameters": rep.router_parameters, "num_examples": rep.num_examples,
                 "layer_weights": rep.layer_weights, "num_instructions": rep.num_instructions,
                 "min_instruction_similarity": rep.min_instruction_similarity}, args.json)
    return 0


def _eval(args) -> int:
    from m2vla_core.evaluation.cli import EvalConfig, format_table
    from m2vla_core.packs.evaluation import evaluate_packed
    from m2vla_core.sim.tasks import parse_task_list

    config = EvalConfig(policy=args.policy, backend=args.backend, episodes=args.episodes, seed_offset=args.seed_offset,
                        tasks=tuple(parse_task_list(args.tasks)), max_steps=args.max_steps, gif=False)
    report = evaluate_packed(config, force_by_task=args.by_task, progress=not args.no_progress)
    _write_json(report.to_json(), args.json)
    print(format_table(report))
    return 0


def _route(args) -> int:
    from m2vla_core.packs.evaluation import router_accuracy
    from m2vla_core.sim.tasks import parse_task_list

    tasks = parse_task_list(args.tasks) if args.tasks else None
    result = router_accuracy(args.policy, tasks, episodes=args.episodes, seed_offset=args.seed_offset,
                             progress=not args.no_progress)
    _write_json(result, args.json)
    for task, row in result["per_task"].items():
        print(f"{task:<16} pack {row['pack'] or '-':<10} routed right {row['accuracy'] * 100:5.1f}%  "
              f"refused {row['refusal_rate'] * 100:5.1f}%")
    print(f"router accuracy {result['accuracy'] * 100:.1f}% over {result['episodes_per_task']} held-out seeds per task "
          f"(from {result['seed_offset']}); route p50 {result['route_us_p50']:.0f} us")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2vla pack", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--threads", type=int, default=1, help="torch threads (before the subcommand)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a head on some tasks alone and save it as a pack")
    t.add_argument("--data", required=True, help="feature dataset (all tasks; filtered by --tasks)")
    t.add_argument("--tasks", required=True, help="comma-separated task names of this pack")
    t.add_argument("--name", required=True, help="pack name ([A-Za-z0-9_.-])")
    t.add_argument("--out", required=True, help="pack directory to write")
    t.add_argument("--config", default="mol+msm", help="RunConfig JSON or preset name")
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--work", default="", help="where the filtered dataset goes (default OUT.data)")
    t.add_argument("--router-frames", type=int, default=1, help="first frames per episode kept as router examples")
    t.add_argument("--no-export", action="store_true", help="skip model.onnx (torch backend only)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)
    c = sub.add_parser("combine", help="combine packs into one routed policy (packs are not retrained)")
    c.add_argument("--packs", required=True, help="comma-separated pack directories")
    c.add_argument("--out", required=True, help="pack-set directory to write")
    c.add_argument("--min-confidence", type=float, default=0.8, help="router probability below which the policy refuses")
    c.add_argument("--min-instruction-similarity", default="auto", type=_similarity,
                   help="refuse instructions less similar than this to every training one; 'auto' (calibrated "
                        "from the training instructions) or a number in [0, 1] (0: off)")
    c.add_argument("--router-steps", type=int, default=300)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", default="", help="write the combine report here")
    c.set_defaults(func=_combine)
    e = sub.add_parser("eval", help="closed-loop success of a pack set (router on) or of each pack on its tasks")
    e.add_argument("--policy", required=True)
    e.add_argument("--by-task", action="store_true", help="skip the router: each episode uses its task's pack")
    e.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed-offset", type=int, default=1000)
    e.add_argument("--tasks", default="all")
    e.add_argument("--max-steps", type=int, default=200)
    e.add_argument("--json", default="")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_eval)
    r = sub.add_parser("route", help="router accuracy on the first observation of held-out seeds")
    r.add_argument("--policy", required=True)
    r.add_argument("--tasks", default="", help="default: the tasks the packs cover; others count as 'should refuse'")
    r.add_argument("--episodes", type=int, default=50)
    r.add_argument("--seed-offset", type=int, default=1000)
    r.add_argument("--json", default="")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_route)
    return p


def _check_args(args) -> None:
    """Refuse, before any model loads, counts below 1 and a --json that could not be written."""
    from m2vla_core.paths import check_destination

    for flag in ("threads", "episodes"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    if getattr(args, "json", ""):
        check_destination(args.json, "--json", directory=False)


def pack_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from m2vla_core.config_io import ConfigError
    from m2vla_core.heads.checkpoint import CheckpointError
    from m2vla_core.training.feature_dataset import DatasetError

    try:
        _check_args(args)
        import torch

        torch.set_num_threads(args.threads)  # one thread: on shared cores, more threads made training ~15x slower here
        return args.func(args)
    except (ConfigError, CheckpointError, DatasetError, ValueError, KeyError, OSError) as exc:
        print(f"m2vla pack {args.cmd}: {exc}", file=sys.stderr)
        return 2
