"""``m2vla train --data DIR --out CKPT [--config JSON|PRESET] [--steps N] [--resume] [--seed S]``."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from m2vla_core.config_io import ConfigError, load_json
from m2vla_core.heads.checkpoint import CheckpointError
from m2vla_core.heads.factory import DEFAULT_PRESET, PRESETS
from m2vla_core.training.feature_dataset import DatasetError
from m2vla_core.training.trainer import RunConfig, run_config_from_preset, saved_run_config, train


def resolve_run_config(spec: str) -> RunConfig:
    """A path to a RunConfig JSON file, a trained checkpoint directory (the RunConfig it was
    trained with, from its train.json) or a preset name (strict, with did-you-mean)."""
    if Path(spec).is_dir():
        return saved_run_config(spec)
    if spec.endswith(".json") or Path(spec).is_file():
        return load_json(RunConfig, spec)
    try:
        return run_config_from_preset(spec)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from exc


def _parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in PRESETS.items())
    p = argparse.ArgumentParser(prog="m2vla train", description="Train a head on cached backbone features.",
                                epilog=f"presets:\n{presets}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="feature dataset directory (meta.json + shards)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", help="RunConfig JSON file, trained checkpoint directory or preset name "
                   f"(default {DEFAULT_PRESET}; with --resume: the run's own config)")
    p.add_argument("--steps", type=int, help="total optimisation steps (overrides the config)")
    p.add_argument("--batch-size", type=int, help="overrides the config")
    p.add_argument("--seed", type=int, help="overrides the config")
    p.add_argument("--aux-weight", type=float,
                   help="weight of the auxiliary object-position loss (arch.aux_weight; needs a dataset from "
                        "`m2vla features --object-targets`); overrides the config")
    p.add_argument("--aux-first-frames", type=int,
                   help="learn the auxiliary targets from each episode's first N frames only (0 = all); overrides "
                        "the config")
    p.add_argument("--position-noise-cm", type=float,
                   help="std per axis [cm] of noise on the named objects' x, y in a --privileged-state dataset's "
                        "state: for a head that will read them from an object localiser; overrides the config")
    p.add_argument("--gripper-features", choices=("panda", "none"),
                   help="panda: the head also reads the gripper's position (forward kinematics of the joints, "
                        "inside the head) and the vectors from it to the named objects; overrides the config")
    p.add_argument("--relative-actions", choices=("on", "off"),
                   help="on: the layers predict waypoints as offsets from the current joints (the head adds them "
                        "back; it still emits absolute targets); overrides the config")
    p.add_argument("--action-loss", choices=("mse", "l1"),
                   help="action loss in normalised units (validation reports the MSE either way); overrides the config")
    p.add_argument("--grasp-point-weight", type=float,
                   help="add this weight times the grasp-point error [cm] (where the predicted vs the demonstrated "
                        "waypoints put the gripper; needs --gripper-features panda) to the loss; overrides the config")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=int, help="end this session at this step (resumable checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def train_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.config is None:
            run = saved_run_config(args.out) if args.resume else run_config_from_preset(DEFAULT_PRESET)
        else:
            run = resolve_run_config(args.config)
        noise_m = None if args.position_noise_cm is None else args.position_noise_cm / 100.0
        overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed),
                                       ("aux_first_frames", args.aux_first_frames), ("position_noise_m", noise_m),
                                       ("action_loss", args.action_loss),
                                       ("grasp_point_weight", args.grasp_point_weight))
                     if v is not None}
        arch = run.arch if args.aux_weight is None else replace(run.arch, aux_weight=args.aux_weight)
        if args.gripper_features is not None:
            arch = replace(arch, gripper_features="" if args.gripper_features == "none" else args.gripper_features)
        if args.relative_actions is not None:
            arch = replace(arch, relative_actions=args.relative_actions == "on")
        run = replace(run, arch=arch, train=replace(run.train, **overrides))  # one check of both together
        result = train(args.data, args.out, run, resume=args.resume, progress=not args.no_progress,
                       stop_after=args.stop_after)
    except (ConfigError, CheckpointError, DatasetError, ValueError, OSError) as exc:
        print(f"m2vla train: {exc}", file=sys.stderr)
        return 2
    last_val = f"{result.val_loss[-1][1]:.5f}" if result.val_loss else "n/a (single-episode dataset)"
    print(f"trained to step {result.step} in {result.seconds:.1f} s; final train loss "
          f"{result.train_loss[-1][1] if result.train_loss else float('nan'):.5f}, val loss {last_val}")
    if result.val_grasp_point_cm:
        print(f"grasp point: validation error {result.val_grasp_point_cm[-1][1]:.2f} cm (mean per axis, where the "
              f"waypoints put the gripper)")
    if result.val_aux_rmse:
        print(f"auxiliary targets: validation RMS error {result.val_aux_rmse[-1][1]:.4f} (their units, e.g. m)")
    print(f"checkpoint: {result.out_dir}")
    return 0
