"""``m2vla ablate``: train and evaluate head variants on the same feature data and backbone.

Each variant is a preset (``last+mlp``, ``uniform+mlp``, ``mol+mlp``, ``last+msm``,
``mol+msm``, ...). Only the layer mix and the action head change between rows: everything
else (d_model, queries, MSM memory, training schedule, seeds) comes from one base RunConfig
(``--base-config``, default the ``mol+msm`` preset), so a difference in the table is the
ablated part. Each variant is trained, exported to ONNX, benchmarked (head step, batch 1,
onnxruntime, one thread) and rolled out closed-loop on the held-out evaluation seeds.

A head trained on a ``--privileged-state`` dataset reads the named objects' positions, which on
a robot (and in this evaluation) come from an object localiser: ``--localiser DIR`` puts that
localiser beside every variant, so the rows are measured the way the policy runs.

Output: ``ablation.md`` + ``ablation.json`` in ``--out`` (and one checkpoint per variant).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from m2vla_core.evaluation.rollout import ENSEMBLE_CHUNKS, ENSEMBLE_DECAY, EXECUTE_STEPS

DEFAULT_VARIANTS = ("last+mlp", "uniform+mlp", "mol+mlp", "last+msm", "mol+msm")


def variant_run_config(base, preset: str):
    """``base`` RunConfig with the preset's layer mix and action head swapped in."""
    from m2vla_core.heads.factory import get_preset

    arch = get_preset(preset)
    mixed = replace(base.arch, mol=replace(base.arch.mol, mix=arch.mol.mix, top_k=arch.mol.top_k if arch.mol.mix == "router"
                                           else 0), action_head=arch.action_head)
    return replace(base, arch=mixed, preset=preset)


def run_ablation(features_dir: str | os.PathLike, out_dir: str | os.PathLike, *, variants=DEFAULT_VARIANTS,
                 base=None, steps: int | None = None, eval_config=None, progress: bool = True,
                 bench_iters: int = 300, localiser_dir: str | os.PathLike | None = None) -> dict:
    """Train + export + benchmark + evaluate every variant; returns the table as a dict."""
    from m2vla_core.evaluation.cli import EvalConfig, evaluate
    from m2vla_core.export.bench import benchmark_head
    from m2vla_core.export.onnx_export import export_onnx
    from m2vla_core.heads.localiser import load_localiser, save_localiser
    from m2vla_core.training.feature_dataset import FeatureDataset
    from m2vla_core.training.trainer import run_config_from_preset, train

    localiser = None
    if localiser_dir is not None:  # checked (backbone included) before hours of training
        meta = FeatureDataset(features_dir, load=False).meta  # the backbone it names, not 4 GB of shards
        localiser = load_localiser(localiser_dir, backbone=(meta.backbone_id, meta.backbone_digest))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base or run_config_from_preset("mol+msm")
    if steps is not None:
        base = replace(base, train=replace(base.train, steps=steps))
    eval_config = eval_config or EvalConfig()
    rows = []
    for preset in variants:
        t0 = time.perf_counter()
        run = variant_run_config(base, preset)
        ckpt = out / preset.replace("+", "_")
        result = train(features_dir, ckpt, run, progress=progress, plot=False)
        exported = export_onnx(ckpt)
        if not exported.ok:
            raise RuntimeError(f"{preset}: ONNX parity failed ({exported.max_abs_error:.2e})")
        if localiser is not None:
            save_localiser(localiser, ckpt)
        bench = benchmark_head(ckpt, iters=bench_iters, warmup=max(10, bench_iters // 10))
        report = evaluate(replace(eval_config, policy=str(ckpt), backend="onnxruntime", gif=False), progress=progress)
        rows.append({"variant": preset, "success": report.success, "mean_success": report.mean_success,
                     "trainable_params": int(bench["trainable_params"]),
                     "head_us_p50_onnxruntime": bench["onnxruntime"]["p50_us"],
                     "head_us_p50_torch": bench["torch"]["p50_us"],
                     "final_train_loss": result.train_loss[-1][1] if result.train_loss else None,
                     "final_val_loss": result.val_loss[-1][1] if result.val_loss else None,
                     "checkpoint": str(ckpt), "seconds": time.perf_counter() - t0})
        _write(out, rows, features_dir, base, eval_config, localiser_dir)  # partial tables survive an interrupted run
    return {"rows": rows}


def format_markdown(rows: list[dict], eval_config=None) -> str:
    tasks = list(rows[0]["success"]) if rows else []
    head = ["variant", *tasks, "mean", "val loss", "trainable params", "head p50 [us]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["variant"], *(f"{r['success'][t] * 100:.0f}%" for t in tasks), f"**{r['mean_success'] * 100:.1f}%**",
                 "n/a" if r.get("final_val_loss") is None else f"{r['final_val_loss']:.4f}", f"{r['trainable_params']:,}", f"{r['head_us_p50_onnxruntime']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if eval_config is not None:
        lines.append("")
        lines.append(f"{eval_config.episodes} episodes per task, seeds {eval_config.seed_offset}.."
                     f"{eval_config.seed_offset + eval_config.episodes - 1}, execute {eval_config.execute_steps} "
                     f"waypoints per chunk, the mean of the newest {eval_config.ensemble_chunks} chunks, max {eval_config.max_steps} steps; head latency: onnxruntime, batch 1, "
                     f"1 thread.")
    return "\n".join(lines) + "\n"


def _write(out: Path, rows: list[dict], features_dir, base, eval_config, localiser_dir) -> None:
    from dataclasses import asdict

    from m2vla_core.config_io import to_dict

    payload = {"features": str(features_dir), "localiser": None if localiser_dir is None else str(localiser_dir),
               "base_config": to_dict(base), "eval": asdict(eval_config), "rows": rows}
    (out / "ablation.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(format_markdown(rows, eval_config), encoding="utf-8")


def cli_main(argv: list[str]) -> int:
    from m2vla_core.evaluation.cli import DEFAULT_SEED_OFFSET, MAX_WORKERS

    p = argparse.ArgumentParser(prog="m2vla ablate", description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True, help="feature dataset directory (from `m2vla features`)")
    p.add_argument("--out", required=True, help="directory for ablation.md / ablation.json and the checkpoints")
    p.add_argument("--localiser", help="object localiser directory put beside every variant (for a head trained "
                   "on a --privileged-state dataset; e.g. the shipped policy's directory)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated head presets")
    p.add_argument("--base-config", default="", help="RunConfig JSON, trained checkpoint directory (its recipe) "
                   "or preset shared by all variants (default mol+msm)")
    p.add_argument("--steps", type=int, help="training steps per variant (overrides the base config)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task")
    p.add_argument("--seed-offset", type=int, default=DEFAULT_SEED_OFFSET)
    p.add_argument("--tasks", default="all")
    p.add_argument("--workers", type=int, default=1, help=f"evaluation worker processes (1..{MAX_WORKERS})")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--execute-steps", type=int, default=EXECUTE_STEPS)
    p.add_argument("--ensemble-chunks", type=int, default=ENSEMBLE_CHUNKS)
    p.add_argument("--ensemble-decay", type=float, default=ENSEMBLE_DECAY)
    p.add_argument("--bench-iters", type=int, default=300)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from m2vla_core.config_io import ConfigError
        from m2vla_core.evaluation.cli import EvalConfig
        from m2vla_core.heads.factory import get_preset
        from m2vla_core.sim.tasks import parse_task_list
        from m2vla_core.training.cli import resolve_run_config

        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in variants:
            get_preset(v)  # strict lookup before any training
        base = resolve_run_config(args.base_config) if args.base_config else None
        eval_config = EvalConfig(episodes=args.episodes, seed_offset=args.seed_offset,
                                 tasks=tuple(parse_task_list(args.tasks)), workers=args.workers,
                                 max_steps=args.max_steps, execute_steps=args.execute_steps,
                                 ensemble_chunks=args.ensemble_chunks, ensemble_decay=args.ensemble_decay, gif=False)
        table = run_ablation(args.features, args.out, variants=variants, base=base, steps=args.steps,
                             eval_config=eval_config, progress=not args.no_progress, bench_iters=args.bench_iters,
                             localiser_dir=args.localiser)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"m2vla ablate: {exc}", file=sys.stderr)
        return 2
    print(format_markdown(table["rows"], eval_config))
    return 0
