"""The printed table and the PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(section, figure, value, target) lines of the summary table."""
    out: list[tuple[str, str, str, str]] = []

    def add(section: str, figure: str, value, target: str = "") -> None:
        out.append((section, figure, _fmt(value), target))

    h = results.get("head")
    if h:
        add("head", "onnxruntime step p50 / p99 [us]", f"{h['onnxruntime_p50_us']:.0f} / {h['onnxruntime_p99_us']:.0f}",
            f"p99 <= {h['target_onnxruntime_p99_us']:.0f}  {_fmt(h['target_met'])}")
        add("head", "torch step p50 / p99 [us]", f"{h['torch_p50_us']:.0f} / {h['torch_p99_us']:.0f}")
        add("head", "speedup onnxruntime vs torch (p50)", h["speedup_onnxruntime_vs_torch"])
    b = results.get("backbone")
    if b:
        for name in ("policy_contract", "shallow_contract"):
            c = b[name]
            add("backbone", f"{name} {c['layers']}: baseline / both p50 [ms]",
                f"{c['baseline_p50_ms']:.1f} / {c['both_p50_ms']:.1f}",
                f"<= {b['target_frame_ms']:.0f}  {_fmt(c['both_p50_ms'] <= b['target_frame_ms'])}" if name == "policy_contract" else "")
            add("backbone", f"{name}: speedup reuse / stop / both",
                f"{c['speedup_reuse_instruction']:.2f} / {c['speedup_stop_at_deepest']:.2f} / {c['speedup_both']:.2f}")
        add("backbone", "feature cache hit p50 / p99 [us]", f"{b['cache_hit_p50_us']:.0f} / {b['cache_hit_p99_us']:.0f}",
            f"<= {b['target_cache_hit_us']:.0f}")
    t = results.get("vs_text_actions")
    if t:
        add("vs_text_actions", f"text actions, {t['text_tokens_count']} tokens, p50 [ms]", t["text_actions_p50_ms"])
        add("vs_text_actions", "MoL+MSM chunk (features + head) p50 [ms]", t["mol_msm_p50_ms"])
        add("vs_text_actions", "speedup_vs_text_actions", t["speedup_vs_text_actions"],
            f">= {t['target_speedup']:.0f}  {_fmt(t['target_met'])}")
        for r in t["scaling"]:
            add("vs_text_actions", f"  H={r['chunk_len_count']} A={r['action_dim_count']}: text / ours [ms], speedup",
                f"{r['text_actions_p50_ms']:.0f} / {r['mol_msm_p50_ms']:.1f}, {r['speedup_vs_text_actions']:.1f}x")
    r = results.get("ros_path")
    if r and not r.get("skipped"):
        add("ros_path", "instruction -> first command p50 / p99 [ms]",
            f"{r['instruction_to_first_command_p50_ms']:.0f} / {r['instruction_to_first_command_p99_ms']:.0f}",
            f"<= {r['target_instruction_to_first_command_ms']:.0f}  {_fmt(r['target_met'])}")
        for p in ("instruction_to_features", "instruction_perception_compute", "instruction_to_first_chunk",
                  "frame_to_features", "perception_compute", "frame_to_chunk", "frame_to_first_command"):
            add("ros_path", f"{p.replace('_', ' ')} p50 / p99 [ms]", f"{r[p + '_p50_ms']:.0f} / {r[p + '_p99_ms']:.0f}")
        add("ros_path", "features message [bytes]", r["features_message_bytes"])
    elif r:
        add("ros_path", "skipped", r.get("reason", ""))
    for key in ("controller_250hz", "controller_500hz"):
        c = results.get(key)
        if c and not c.get("skipped"):
            add(key, "rate [Hz], on time, period error p50 / p99 [ms]",
                f"{c['achieved_rate_hz']:.1f}, {100 * c['on_time_fraction']:.2f} %, "
                f"{c['period_error_p50_ms']:.3f} / {c['period_error_p99_ms']:.3f}",
                f">= 99 %, p99 <= 1 ms  {_fmt(c['target_met'])}" if key == "controller_250hz" else "")
    s = results.get("scaling")
    if s:
        for name, key in (("head_vs_layers", "layers_count"), ("head_vs_tokens", "tokens_count"),
                          ("head_vs_skills_k", "skills_k_count"), ("head_vs_chunk_len", "chunk_len_count")):
            add("scaling", f"{name} p50 [us]", ", ".join(f"{x[key]}: {x['p50_us']:.0f}" for x in s[name]))
        for m in s["feature_message"]:
            add("scaling", f"features/frame {m['backbone']} all / contract [KB fp32]",
                f"{m['all_layers_float32_bytes'] / 1e3:,.0f} / {m['contract_float32_bytes'] / 1e3:,.0f} "
                f"(saves {100 * m['contract_saves_fraction']:.1f} %)")
    g = results.get("gpu")
    if g:
        add("gpu", "skipped" if g.get("skipped") else "backbone baseline / both p50 [ms]",
            g.get("reason", "") if g.get("skipped") else f"{g['backbone_baseline_p50_ms']:.1f} / {g['backbone_both_p50_ms']:.1f}")
    return out


def table(results: dict) -> str:
    lines = rows(results)
    w = [max(len(x[i]) for x in lines) if lines else 0 for i in range(4)]
    header = ("section", "figure", "value", "target")
    w = [max(w[i], len(header[i])) for i in range(4)]
    fmt = lambda x: "  ".join(x[i].ljust(w[i]) for i in range(4)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * n for n in w)), *(fmt(x) for x in lines)])


def plots(results: dict, samples: dict, out_dir: Path) -> list[Path]:
    """Write one PNG per measured section; -> their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "head" in samples:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, xs in samples["head"].items():
            ax.hist(np.asarray(xs), bins=np.logspace(1.5, 4.5, 80), alpha=0.6, label=name)
        ax.set_xscale("log")
        ax.axvline(2000, color="k", ls="--", lw=1, label="p99 target")
        ax.set(xlabel="head step [us] (batch 1)", ylabel="count", title="MoL+MSM head: torch vs onnxruntime")
        ax.legend()
        save(fig, "head.png")
    b = results.get("backbone")
    if b:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ("baseline", "stop_at_deepest", "reuse_instruction", "both")
        x = np.arange(len(names))
        for i, key in enumerate(("policy_contract", "shallow_contract")):
            c = b[key]
            ax.bar(x + 0.4 * i, [c[f"{n}_p50_ms"] for n in names], 0.4, label=f"{key} {c['layers']}")
        ax.set_xticks(x + 0.2, names)
        ax.set(ylabel="ms / new frame (p50)", title="tiny backbone: per-frame features")
        ax.legend()
        save(fig, "backbone.png")
    t = results.get("vs_text_actions")
    if t:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sc = sorted(t["scaling"], key=lambda r: r["text_tokens_count"])
        n = [r["text_tokens_count"] for r in sc]
        ax.plot(n, [r["text_actions_p50_ms"] for r in sc], "o-", label="text actions (greedy, KV cache)")
        ax.plot(n, [r["mol_msm_p50_ms"] for r in sc], "s-", label="MoL+MSM (features + head)")
        ax.set_yscale("log")
        ax.set(xlabel="H x A action values per chunk", ylabel="ms per chunk (p50)", title="chunk latency, same backbone")
        ax.legend()
        save(fig, "vs_text_actions.png")
    s = results.get("scaling")
    if s:
        fig, axes = plt.subplots(2, 2, figsize=(8, 6))
        for ax, (name, key, label) in zip(axes.flat, (("head_vs_layers", "layers_count", "layers mixed"),
                                                      ("head_vs_tokens", "tokens_count", "tokens per layer"),
                                                      ("head_vs_skills_k", "skills_k_count", "K retrieved skills"),
                                                      ("head_vs_chunk_len", "chunk_len_count", "chunk length H"))):
            xs = [r[key] for r in s[name]]
            ax.plot(xs, [r["p50_us"] for r in s[name]], "o-", label="p50")
            ax.plot(xs, [r["p99_us"] for r in s[name]], "x--", label="p99")
            ax.set(xlabel=label, ylabel="head step [us]")
            ax.legend()
        fig.suptitle("onnxruntime head latency scaling")
        save(fig, "scaling.png")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        fm = s["feature_message"]
        x = np.arange(len(fm))
        ax.bar(x - 0.2, [m["all_layers_float32_bytes"] for m in fm], 0.4, label="all layers, all tokens")
        ax.bar(x + 0.2, [m["contract_float32_bytes"] for m in fm], 0.4, label="feature contract")
        ax.set_yscale("log")
        ax.set_xticks(x, [m["backbone"] for m in fm], fontsize=8)
        ax.set(ylabel="bytes per frame (float32)", title="feature message size")
        ax.legend()
        save(fig, "feature_message.png")
    r = results.get("ros_path")
    if r and not r.get("skipped"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ("frame_to_features", "frame_to_chunk", "frame_to_first_command", "instruction_to_features",
                 "instruction_to_first_chunk", "instruction_to_first_command")
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r[f"{n}_p50_ms"] for n in names], 0.4, label="p50")
        ax.bar(x + 0.2, [r[f"{n}_p99_ms"] for n in names], 0.4, label="p99")
        ax.set_xticks(x, [n.replace("_to_", "\n-> ").replace("_", " ") for n in names], fontsize=7)
        ax.set(ylabel="ms", title="ROS path across processes")
        ax.legend()
        save(fig, "ros_path.png")
    return written
