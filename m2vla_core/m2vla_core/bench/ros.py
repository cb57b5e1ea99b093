"""Core side of the ROS measurements: pick the policy, run ``m2vla_ros.bench_ros`` in a child
with the ROS environment (this package never imports ROS), read back its JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from m2vla_core.bench.heads import random_policy_dir, shipped_policy_dir
from m2vla_core.bench.settings import BenchSettings
from m2vla_core.rosenv import project_root, ros_environment, run_ros_module, workspace_install

TARGET_INSTRUCTION_TO_COMMAND_MS = 200.0  # DESIGN.md
TARGET_ON_TIME_FRACTION = 0.99  # DESIGN.md, at 250 Hz
TARGET_PERIOD_ERROR_P99_MS = 1.0  # DESIGN.md, at 250 Hz
SECTION_KEYS = ("ros_path", "controller_250hz", "controller_500hz")


def skip_reason() -> str:
    if not (workspace_install() / "share" / "m2vla_msgs").is_dir():
        return f"ROS interfaces not built under {workspace_install()} (run `make setup`)"
    return ""


def child_environment() -> dict[str, str]:
    """ROS environment on a private domain. In a checkout, the source m2vla_ros comes first on
    PYTHONPATH so the benchmark times the code in the tree even when the colcon install is older."""
    env = ros_environment()
    env.setdefault("ROS_DOMAIN_ID", str(10 + os.getpid() % 80))
    source = project_root() / "m2vla_ros"
    if (source / "m2vla_ros" / "bench_ros.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")])
    return env


def policy_for_ros(out_dir: Path) -> tuple[str, str]:
    """(checkpoint dir, description): the shipped policy, else a random head written under out_dir."""
    shipped = shipped_policy_dir()
    if shipped is not None and (shipped / "model.onnx").is_file():
        return str(shipped), f"shipped policy {shipped}"
    from m2vla_core.backbone.tiny import default_backbone_digest

    path = random_policy_dir(out_dir / "random_policy", "qwen2_vl:tiny_qwen2vl", default_backbone_digest())
    return str(path), "random-weight MoL+MSM head (no shipped policy in this install)"


def run(settings: BenchSettings, out_dir: Path, rt_priority: int = 0) -> dict:
    """{"ros_path": {...}, "controller_250hz": {...}, "controller_500hz": {...}} or skipped entries."""
    reason = skip_reason()
    if reason:
        return {k: {"skipped": True, "reason": reason} for k in SECTION_KEYS}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy, description = policy_for_ros(out_dir)
    raw = out_dir / "ros_raw.json"
    raw.unlink(missing_ok=True)
    code = run_ros_module("m2vla_ros.bench_ros", ["--json", str(raw), "--policy", policy, "--trials",
                                                  str(settings.ros_trials), "--controller-seconds",
                                                  str(settings.controller_duration_s), "--log-dir", str(out_dir / "logs"),
                                                  "--controller-rt-priority", str(rt_priority)],
                          env=child_environment())
    if not raw.is_file():
        why = f"m2vla_ros.bench_ros exited with code {code} and wrote no results (logs: {out_dir / 'logs'})"
        return {k: {"skipped": True, "reason": why} for k in SECTION_KEYS}
    result = json.loads(raw.read_text(encoding="utf-8"))
    errors = result.get("errors", [])
    out = {}
    for key in SECTION_KEYS:
        section = result.get(key)
        out[key] = section if section is not None else {"skipped": True, "reason": "; ".join(errors) or "no data"}
    if "skipped" not in out["ros_path"]:
        rp = out["ros_path"]
        rp["policy"] = description
        rp["graph_ready_s"] = result.get("graph_ready_s", float("nan"))
        rp["errors"] = errors
        rp["target_instruction_to_first_command_ms"] = TARGET_INSTRUCTION_TO_COMMAND_MS
        rp["target_met"] = bool(rp["instruction_to_first_command_p99_ms"] <= TARGET_INSTRUCTION_TO_COMMAND_MS)
    for key in ("controller_250hz", "controller_500hz"):
        c = out[key]
        if "skipped" not in c:
            c["rt_priority_count"] = rt_priority  # 0: scheduled as shipped; > 0: SCHED_FIFO experiment
            c["target_on_time_fraction"] = TARGET_ON_TIME_FRACTION
            c["target_period_error_p99_ms"] = TARGET_PERIOD_ERROR_P99_MS
            c["target_met"] = bool(c["on_time_fraction"] >= TARGET_ON_TIME_FRACTION
                                   and c["period_error_p99_ms"] <= TARGET_PERIOD_ERROR_P99_MS)
    return out
