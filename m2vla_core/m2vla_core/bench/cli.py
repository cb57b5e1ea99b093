"""``m2vla bench [--what ...] [--json PATH] [--out DIR] [--quick]``: run the benchmark sections,
print a table, write JSON and PNG plots. See ``docs/performance.md`` for measured figures."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from m2vla_core.bench.settings import FULL, QUICK, SECTION_ALIASES, SECTIONS, BenchSettings


def parse_sections(text: str) -> list[str]:
    """'all' or a comma list (aliases ros_path/controller -> ros); unknown names raise ValueError."""
    if text.strip() in ("", "all"):
        return list(SECTIONS)
    chosen: list[str] = []
    for raw in text.split(","):
        name = SECTION_ALIASES.get(raw.strip(), raw.strip())
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, [*SECTIONS, *SECTION_ALIASES], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown bench section {raw.strip()!r}{hint}; known: {', '.join(SECTIONS)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _meta(argv: list[str], settings: BenchSettings, sections: list[str], quick: bool) -> dict:
    import onnxruntime
    import torch
    import transformers

    return {"command": "m2vla bench " + " ".join(argv), "quick": quick, "sections": sections,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": 0.0,
            "cpu_count": os.cpu_count() or 0, "load_average_1min_count": os.getloadavg()[0],
            "process_nice_count": os.nice(0), "scheduler": _scheduler_name(),
            "torch_threads_count": settings.threads, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}


def _scheduler_name() -> str:
    policy = os.sched_getscheduler(0)
    return {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR"}.get(policy, str(policy))


def _clean(value):
    """JSON-safe: NaN -> null, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_sections(sections: list[str], settings: BenchSettings, out_dir: Path,
                 rt_priority: int = 0) -> tuple[dict, dict, list[str]]:
    """-> (results by JSON section, raw samples for plots, errors)."""
    import torch

    from m2vla_core.bench import heads

    torch.set_num_threads(settings.threads)  # every in-process section; extra OpenMP threads stall on a busy machine
    results: dict = {}
    samples: dict = {}
    errors: list[str] = []
    head, _ = heads.policy_head()
    contract = head.config.contract
    for name in sections:
        t0 = time.perf_counter()
        print(f"m2vla bench: {name} ...", flush=True)
        try:
            if name == "head":
                from m2vla_core.bench import head as mod

                out = mod.run(settings)
                samples["head"] = out.pop("_samples_us")
                results["head"] = out
            elif name == "backbone":
                from m2vla_core.bench import backbone as mod

                results["backbone"] = mod.run(settings, contract)
            elif name == "vs_text_actions":
                from m2vla_core.bench import text_actions as mod

                results["vs_text_actions"] = mod.run(settings, head)
            elif name == "ros":
                from m2vla_core.bench import ros as mod

                results.update(mod.run(settings, out_dir, rt_priority))
                for key in mod.SECTION_KEYS:
                    sec = results[key]
                    if sec.get("skipped"):
                        errors.append(f"{key}: {sec['reason']}")
                    elif sec.get("errors"):
                        errors += [f"{key}: {e}" for e in sec["errors"]]
            elif name == "scaling":
                from m2vla_core.bench import scaling as mod

                results["scaling"] = mod.run(settings)
            elif name == "gpu":
                from m2vla_core.bench import gpu as mod

                results["gpu"] = mod.run(settings)
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc()
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"m2vla bench: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return results, samples, errors


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m2vla bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="all", help=f"comma-separated sections: {', '.join(SECTIONS)} (default all)")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default OUT/bench.json)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="directory for JSON, plots, node logs")
    parser.add_argument("--quick", action="store_true", help="a few iterations / seconds per section (harness check)")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads")
    parser.add_argument("--controller-rt-priority", type=int, default=0, metavar="N",
                        help="experiment: run the controller process SCHED_FIFO at priority N (needs CAP_SYS_NICE)")
    opts = parser.parse_args(argv)
    try:
        sections = parse_sections(opts.what)
        settings = BenchSettings(**{**(QUICK if opts.quick else FULL).__dict__, "threads": opts.threads})
        if not 0 <= opts.controller_rt_priority <= 99:
            raise ValueError(f"--controller-rt-priority must be 0..99, got {opts.controller_rt_priority}")
    except ValueError as exc:
        print(f"m2vla bench: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    opts.out.mkdir(parents=True, exist_ok=True)
    json_path = opts.json or opts.out / "bench.json"
    t0 = time.perf_counter()
    meta = _meta(argv, settings, sections, opts.quick)
    results, samples, errors = run_sections(sections, settings, opts.out, opts.controller_rt_priority)
    meta["wall_s"] = time.perf_counter() - t0
    meta["load_average_1min_end_count"] = os.getloadavg()[0]
    data = _clean({"meta": meta, **results, "errors": errors})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    from m2vla_core.bench.report import plots, table

    print()
    print(table(results))
    written = plots(results, samples, opts.out)
    print(f"\nm2vla bench: wrote {json_path} and {len(written)} plots to {opts.out} in {meta['wall_s']:.0f} s")
    for err in errors:
        print(f"m2vla bench: ERROR {err}", file=sys.stderr)
    return 1 if errors else 0
