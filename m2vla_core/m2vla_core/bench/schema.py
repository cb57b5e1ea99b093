"""The JSON schema of ``m2vla bench``: every key a full or ``--quick`` run writes.

Numeric keys name their unit (``UNIT_SUFFIXES``); ratios start with ``speedup_``; ``target_met``
is a bool. A nested dict is a sub-object, a one-element list a list of rows with those keys.
The ``gpu`` section is either measured or ``{"skipped": true, "reason": ...}``.
"""

from __future__ import annotations

UNIT_SUFFIXES = ("_us", "_ms", "_s", "_hz", "_fraction", "_bytes", "_count", "_rad")
RATIO_PREFIX = "speedup_"

_P = ("p50", "p99", "mean")


def _pct(prefix: str, unit: str, stats=_P) -> dict:
    return {f"{prefix}{s}_{unit}": None for s in stats}


_CONTRACT = {"layers": None, "layers_run_with_stop_count": None, "layers_total_count": None,
             **{k: None for v in ("baseline", "stop_at_deepest", "reuse_instruction", "both")
                for k in _pct(f"{v}_", "ms")},
             "speedup_stop_at_deepest": None, "speedup_reuse_instruction": None, "speedup_both": None}
_HEAD_ROW = _pct("", "us")
_CONTROLLER = {"nominal_rate_hz": None, "achieved_rate_hz": None, "duration_s": None, "commands_count": None,
               "period_error_p50_ms": None, "period_error_p99_ms": None, "on_time_fraction": None,
               "missed_periods_count": None, "receive_period_error_p99_ms": None, "loop_windows_count": None,
               "loop_period_error_p99_median_window_ms": None, "loop_period_error_p99_worst_window_ms": None,
               "target_on_time_fraction": None, "target_period_error_p99_ms": None, "target_met": None,
               "rt_priority_count": None}

SCHEMA: dict = {
    "meta": {"command": None, "quick": None, "sections": None, "started_utc": None, "wall_s": None,
             "cpu_count": None, "load_average_1min_count": None, "load_average_1min_end_count": None,
             "process_nice_count": None, "scheduler": None, "torch_threads_count": None,
             "python": None, "torch": None, "onnxruntime": None, "transformers": None, "platform": None},
    "head": {"policy": None, "contract_layers": None, "chunk_len_count": None, "action_dim_count": None,
             "trainable_params_count": None, "onnx_parity_max_abs_error_rad": None, "iters_count": None,
             **_pct("torch_", "us"), **_pct("onnxruntime_", "us"), "speedup_onnxruntime_vs_torch": None,
             "target_onnxruntime_p99_us": None, "target_met": None},
    "backbone": {"backbone": None, "frozen_params_count": None, "trainable_params_count": None,
                 "image_tokens_native_count": None, "instruction_tokens_count": None,
                 "frames_count": None, "policy_contract": _CONTRACT, "shallow_contract": _CONTRACT,
                 **_pct("cache_hit_", "us"), "cache_hit_forward_passes_count": None, "target_frame_ms": None,
                 "target_cache_hit_us": None, "target_met": None},
    "vs_text_actions": {"chunk_len_count": None, "action_dim_count": None, "text_tokens_count": None,
                        "iters_count": None, **_pct("text_actions_", "ms"), **_pct("mol_msm_", "ms"),
                        **_pct("features_", "ms"), **_pct("head_", "us"), "text_actions_per_token_ms": None,
                        "speedup_vs_text_actions": None, "target_speedup": None, "target_met": None,
                        "scaling": [{"chunk_len_count": None, "action_dim_count": None, "text_tokens_count": None,
                                     **_pct("text_actions_", "ms"), **_pct("head_", "us"), "mol_msm_p50_ms": None,
                                     "speedup_vs_text_actions": None}]},
    "ros_path": {"policy": None, "graph_ready_s": None, "errors": None, "trials_count": None,
                 "instruction_to_first_command_samples_ms": None,
                 **{f"{p}_{s}": None for p in ("instruction_to_features", "instruction_perception_compute",
                                               "perception_compute", "instruction_to_first_chunk", "instruction_to_first_command",
                                               "frame_to_features", "frame_to_chunk", "frame_to_first_command")
                    for s in ("p50_ms", "p99_ms", "count")},
                 "features_message_bytes": None, "target_instruction_to_first_command_ms": None, "target_met": None},
    "controller_250hz": {**_CONTROLLER, "chunks_accepted_count": None, "chunks_rejected_count": None},
    "controller_500hz": _CONTROLLER,
    "scaling": {"backend": None, "iters_count": None,
                "head_vs_layers": [{"layers_count": None, "layers": None, **_HEAD_ROW}],
                "head_vs_tokens": [{"tokens_count": None, **_HEAD_ROW}],
                "head_vs_skills_k": [{"skills_k_count": None, **_HEAD_ROW}],
                "head_vs_chunk_len": [{"chunk_len_count": None, **_HEAD_ROW}],
                "feature_message": [{"backbone": None, "hidden_size_count": None, "num_layers_count": None,
                                     "all_layers_float32_bytes": None, "all_layers_bfloat16_bytes": None,
                                     "contract_float32_bytes": None, "contract_bfloat16_bytes": None,
                                     "contract_saves_fraction": None}]},
    "gpu": {"skipped": None},
}
SECTION_OF = {"head": "head", "backbone": "backbone", "vs_text_actions": "vs_text_actions", "ros_path": "ros",
              "controller_250hz": "ros", "controller_500hz": "ros", "scaling": "scaling", "gpu": "gpu"}


def missing_keys(data: dict, schema: dict | None = None, path: str = "") -> list[str]:
    """Dotted paths of schema keys absent from ``data`` (list rows: every row is checked)."""
    schema = SCHEMA if schema is None else schema
    out = []
    for key, sub in schema.items():
        where = f"{path}{key}"
        if key not in data:
            out.append(where)
        elif isinstance(sub, dict):
            out += missing_keys(data[key], sub, where + ".") if isinstance(data[key], dict) else [where + " (not an object)"]
        elif isinstance(sub, list):
            rows = data[key]
            if not isinstance(rows, list) or not rows:
                out.append(where + " (no rows)")
            else:
                for i, row in enumerate(rows):
                    out += missing_keys(row, sub[0], f"{where}[{i}].")
    return out


def unitless_numeric_keys(data, path: str = "") -> list[str]:
    """Dotted paths of numeric values whose key names no unit (and is not a ratio or a flag)."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}{key}"
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and not (key.endswith(UNIT_SUFFIXES) or key.startswith(RATIO_PREFIX)
                                                        or key.startswith("target_speedup")):
                out.append(where)
            elif isinstance(value, (dict, list)):
                out += unitless_numeric_keys(value, where + ".")
    elif isinstance(data, list):
        for i, row in enumerate(data):
            out += unitless_numeric_keys(row, f"{path}[{i}].")
    return out
