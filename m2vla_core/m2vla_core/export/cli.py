"""``m2vla export CKPT [--out model.onnx] [--exporter legacy|dynamo|auto]``: export + verify parity."""

from __future__ import annotations

import argparse
import sys

from m2vla_core.config_io import ConfigError
from m2vla_core.export.onnx_export import EXPORTERS, PARITY_ATOL, export_onnx
from m2vla_core.heads.checkpoint import CheckpointError


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="m2vla export", description="Export a head checkpoint to ONNX and verify it "
                                "against torch (max abs error must be <= --atol).")
    p.add_argument("checkpoint", help="head checkpoint directory")
    p.add_argument("--out", help="ONNX file (default CKPT/model.onnx)")
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    p.add_argument("--atol", type=float, default=PARITY_ATOL, help="max abs error allowed (float32)")
    args = p.parse_args(argv)
    try:
        result = export_onnx(args.checkpoint, args.out, exporter=args.exporter, atol=args.atol)
    except (CheckpointError, ConfigError, RuntimeError, ValueError, OSError) as exc:
        print(f"m2vla export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {result.path} ({result.exporter} exporter, onnx.checker ok)")
    print(f"max abs error onnxruntime vs torch: {result.max_abs_error:.3e} (limit {args.atol:.0e})")
    if not result.ok:
        print("m2vla export: parity check FAILED", file=sys.stderr)
        return 1
    return 0
