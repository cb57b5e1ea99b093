"""The benchmark harness: a ``--quick`` run of every section writes every key of the JSON schema,
with units in the key names, a table and plots. No assertion on any time: speed is what the
benchmark reports, not what a test checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from m2vla_core.bench.cli import parse_sections
from m2vla_core.bench.schema import SCHEMA, missing_keys, unitless_numeric_keys
from m2vla_core.bench.scaling import BACKBONES, feature_message_bytes
from m2vla_core.bench.heads import TINY_CONTRACT

QUICK_RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``m2vla bench --quick`` of all sections (graph on its own DDS domain): (exit code, stdout, JSON, out dir)."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(1 + (os.getpid() * 13) % 101)
    proc = subprocess.run([sys.executable, "-m", "m2vla_core.cli", "bench", "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=QUICK_RUN_TIMEOUT_S)
    data = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    return proc.returncode, proc.stdout + proc.stderr, data, out


def test_a_quick_run_of_all_sections_writes_every_key_of_the_schema(quick_run):
    code, output, data, _ = quick_run
    assert data, f"no bench.json written:\n{output[-3000:]}"
    assert data["errors"] == [], data["errors"]
    assert code == 0, output[-3000:]
    assert missing_keys(data) == []


def test_every_numeric_figure_names_its_unit(quick_run):
    _, _, data, _ = quick_run
    assert unitless_numeric_keys(data) == []


def test_the_run_prints_a_table_and_writes_plots(quick_run):
    _, output, data, out = quick_run
    for figure in ("speedup_vs_text_actions", "instruction -> first command", "controller_250hz", "controller_500hz"):
        assert figure in output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"head.png", "backbone.png", "vs_text_actions.png", "scaling.png", "ros_path.png"} <= set(pngs), pngs
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_the_controller_sections_count_commands_at_both_rates(quick_run):
    _, _, data, _ = quick_run
    for key, rate in (("controller_250hz", 250.0), ("controller_500hz", 500.0)):
        assert data[key]["nominal_rate_hz"] == rate
        assert data[key]["commands_count"] > 10, data[key]
        assert 0.0 <= data[key]["on_time_fraction"] <= 1.0


def test_text_actions_decode_one_token_per_action_value(quick_run):
    _, _, data, _ = quick_run
    t = data["vs_text_actions"]
    assert t["text_tokens_count"] == t["chunk_len_count"] * t["action_dim_count"]
    assert [r["text_tokens_count"] for r in t["scaling"]] == [r["chunk_len_count"] * r["action_dim_count"]
                                                              for r in t["scaling"]]


def test_gpu_section_is_skipped_with_a_reason_when_there_is_no_cuda(quick_run):
    import torch

    _, _, data, _ = quick_run
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU section measures instead")
    assert data["gpu"]["skipped"] is True and "CUDA" in data["gpu"]["reason"]


def test_feature_message_sizes_follow_the_config_numbers():
    rows = {r["backbone"]: r for r in feature_message_bytes(TINY_CONTRACT)}
    qwen3b = rows["Qwen2.5-VL-3B"]
    # contract: 3 layers x (16 image + 16 text) tokens x 2048 wide x 4 bytes
    assert qwen3b["contract_float32_bytes"] == 3 * 32 * 2048 * 4
    # all hidden states (36 layers + embeddings) x (64 image + 20 text) tokens x 2048 x 4 bytes
    assert qwen3b["all_layers_float32_bytes"] == 37 * 84 * 2048 * 4
    assert {b.name for b in BACKBONES} >= {"Qwen2.5-VL-3B", "Qwen2.5-VL-7B"}


def test_sections_are_chosen_by_name_and_unknown_names_are_refused_with_a_suggestion():
    assert parse_sections("all") == ["head", "backbone", "vs_text_actions", "ros", "scaling", "gpu"]
    assert parse_sections("head,controller,ros_path") == ["head", "ros"]
    with pytest.raises(ValueError, match="did you mean 'backbone'"):
        parse_sections("backbon")


def test_the_schema_names_the_controller_sections_the_issue_asks_for():
    assert {"on_time_fraction", "period_error_p99_ms"} <= set(SCHEMA["controller_250hz"])
    assert {"on_time_fraction", "period_error_p99_ms"} <= set(SCHEMA["controller_500hz"])
    assert "speedup_vs_text_actions" in SCHEMA["vs_text_actions"]
