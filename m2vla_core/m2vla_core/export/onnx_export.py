"""Export a head checkpoint to ONNX (dynamic batch) and verify it against torch.

The graph takes ``features`` float32 (B, n_layers, T, D), ``mask`` bool (B, T), ``state``
float32 (B, S) and returns ``chunk`` float32 (B, H, A) in physical units: normalisation and
the MSM skill memory are inside the graph as constants. The head config JSON is stored in the
model's metadata (``m2vla_head_config``) so a runtime can check the contract without side files.

Exporters: "legacy" (TorchScript-based; fast and numerically tight here) is the default,
"dynamo" (torch.export + onnxscript, exported with batch 2 and Dim.DYNAMIC) the alternative;
"auto" tries legacy then dynamo.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2vla_core.config_io import to_dict
from m2vla_core.heads.checkpoint import load_head
from m2vla_core.heads.policy_head import PolicyHead
from m2vla_core.paths import check_destination

INPUT_NAMES = ("features", "mask", "state")
OUTPUT_NAME = "chunk"
CONFIG_METADATA_KEY = "m2vla_head_config"
DEFAULT_ONNX_NAME = "model.onnx"
PARITY_ATOL = 1e-4  # max |onnxruntime - torch| allowed in float32
EXPORTERS = ("legacy", "dynamo", "auto")
OPSET = 17


@dataclass
class ExportResult:
    path: Path
    exporter: str
    max_abs_error: float | None  # None when not verified
    ok: bool


def example_inputs(head: PolicyHead, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs that follow the head's contract: padded text tokens, states near the data."""
    cfg = head.config
    gen = torch.Generator().manual_seed(seed)
    n_layers, tokens, width = cfg.contract.shape
    features = torch.randn(batch, n_layers, tokens, width, generator=gen)  # (B, L, T, D)
    mask = torch.ones(batch, tokens, dtype=torch.bool)  # (B, T)
    n_img, n_txt = cfg.contract.num_image_tokens, cfg.contract.num_text_tokens
    valid_text = torch.randint(1, n_txt + 1, (batch,), generator=gen)
    mask[:, n_img:] = torch.arange(n_txt)[None, :] < valid_text[:, None]
    norm, s = head.normalizer, cfg.state_dim  # the normaliser's first S entries are the given state's
    state = norm.state_mean[:s] + norm.state_std[:s] * torch.randn(batch, s, generator=gen)  # (B, S)
    return features, mask, state


def _export_legacy(head: PolicyHead, path: Path) -> None:
    args = example_inputs(head, 2)
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head, args, str(path), dynamo=False, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True)


def _export_dynamo(head: PolicyHead, path: Path) -> None:
    from torch.export import Dim

    args = example_inputs(head, 2)  # batch >= 2 so the batch dimension is not specialised to 1
    batch = Dim.DYNAMIC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head, args, str(path), dynamo=True, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_shapes={name: {0: batch} for name in INPUT_NAMES}, optimize=True)


def _stamp_metadata(path: Path, head: PolicyHead) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = CONFIG_METADATA_KEY, json.dumps(to_dict(head.config), sort_keys=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def verify_onnx(head: PolicyHead, path: str | os.PathLike, batch_sizes: tuple[int, ...] = (1, 3),
                provider: str = "CPUExecutionProvider") -> float:
    """Max |onnxruntime - torch| over random contract-shaped inputs of several batch sizes."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=[provider])
    worst = 0.0
    for i, batch in enumerate(batch_sizes):
        features, mask, state = example_inputs(head, batch, seed=100 + i)
        with torch.no_grad():
            expected = head(features, mask, state).numpy()
        got = sess.run([OUTPUT_NAME], {"features": features.numpy(), "mask": mask.numpy(), "state": state.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"onnx output shaped {got.shape}, torch {expected.shape} (batch {batch})")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_onnx(checkpoint: str | os.PathLike | PolicyHead, out: str | os.PathLike | None = None, *,
                exporter: str = "legacy", verify: bool = True, atol: float = PARITY_ATOL) -> ExportResult:
    """Export ``checkpoint`` (dir or loaded head) to ``out`` (default CKPT/model.onnx), atomically."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if out is None:
        if isinstance(checkpoint, PolicyHead):
            raise ValueError("out is required when exporting an in-memory head")
        out = Path(checkpoint) / DEFAULT_ONNX_NAME
    out = Path(out)
    # refused before the export: os.replace could not put the model there
    check_destination(out, "out", directory=False, hint=f" (e.g. {out / DEFAULT_ONNX_NAME})")
    head = checkpoint if isinstance(checkpoint, PolicyHead) else load_head(checkpoint)
    head = head.cpu().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        order = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
        errors = []
        used = ""
        for name in order:
            try:
                (_export_legacy if name == "legacy" else _export_dynamo)(head, tmp)
                used = name
                break
            except Exception as exc:  # an exporter failing is reported, the next one is tried
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        if not used:
            raise RuntimeError("ONNX export failed: " + " | ".join(errors))
        _stamp_metadata(tmp, head)
        err = verify_onnx(head, tmp) if verify else None
        if err is None or err <= atol:  # a model that fails parity is not installed
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for extra in out.parent.glob(tmp.name + "*"):
            extra.unlink(missing_ok=True)
    return ExportResult(out, used, err, ok=err is None or err <= atol)
