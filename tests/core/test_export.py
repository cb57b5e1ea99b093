"""ONNX export (dynamic batch, parity with torch), runtimes and the policy-level API."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from m2vla_core.export.cli import export_main
from m2vla_core.export.onnx_export import example_inputs, export_onnx, verify_onnx
from m2vla_core.export.runtime import HeadPolicy, OnnxHeadRuntime, TorchHeadRuntime
from m2vla_core.heads import CheckpointError, ContractError, PolicyHead, save_head
from m2vla_core.heads.factory import small_head_config


def _head(preset: str = "mol+msm", **mol) -> PolicyHead:
    torch.manual_seed(0)
    cfg = small_head_config(preset)
    if mol:
        cfg = replace(cfg, arch=replace(cfg.arch, mol=replace(cfg.arch.mol, **mol)))
    head = PolicyHead(cfg)
    head.normalizer.set_stats(np.linspace(-1, 1, 8), np.full(8, 0.7), np.linspace(0, 1, 8), np.full(8, 0.2))
    if head.uses_memory:
        gen = torch.Generator().manual_seed(1)
        head.action_head.memory.set(torch.randn(64, cfg.contract.width + 8, generator=gen),
                                    torch.randn(64, 16, 8, generator=gen), torch.arange(64))
    if head.mol.config.feature_norm == "standardize":
        gen = torch.Generator().manual_seed(2)
        shape = head.mol.feature_mean.shape
        head.mol.set_feature_stats(torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) + 0.5)
    with torch.no_grad():  # leave the zero-initialised residual path: every branch must matter in parity
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return head.eval()


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_head(_head(), tmp_path / "head")


@pytest.mark.parametrize("preset,mol", [("mol+msm", {}), ("mol+skills", {}), ("last+mlp", {}), ("scalar+mlp", {}),
                                        ("mol+msm", {"top_k": 2}),
                                        ("mol+msm", {"top_k": 2, "feature_norm": "standardize"})])
def test_onnx_matches_torch_for_every_batch_size(tmp_path, preset, mol):
    head = _head(preset, **mol)
    result = export_onnx(head, tmp_path / "h.onnx")
    assert result.ok and result.max_abs_error <= 1e-4
    assert verify_onnx(head, result.path, batch_sizes=(1, 2, 5)) <= 1e-4
    onnx.checker.check_model(onnx.load(str(result.path)))


def test_onnx_has_a_dynamic_batch_and_the_memory_as_constants(ckpt):
    result = export_onnx(ckpt)
    assert result.path == ckpt / "model.onnx"
    model = onnx.load(str(result.path))
    assert [i.name for i in model.graph.input] == ["features", "mask", "state"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)  # symbolic batch
    sizes = {tuple(t.dims) for t in model.graph.initializer}
    assert (64, 16, 8) in sizes  # the skill memory's chunks travel inside the graph


def test_dynamo_exporter_also_passes_parity(tmp_path):
    result = export_onnx(_head(), tmp_path / "d.onnx", exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_abs_error <= 1e-4


def test_cli_export_prints_the_error_and_exits_zero(ckpt, capsys):
    assert export_main([str(ckpt), "--out", str(ckpt / "x.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max abs error onnxruntime vs torch" in out and (ckpt / "x.onnx").is_file()


def test_cli_export_fails_when_parity_is_not_met(ckpt, capsys):
    # a negative tolerance can never be met: exit 1 and no model file left behind
    assert export_main([str(ckpt), "--out", str(ckpt / "z.onnx"), "--atol", "-1"]) == 1
    assert "FAILED" in capsys.readouterr().err and not (ckpt / "z.onnx").exists()


def test_cli_export_refuses_a_pickle_checkpoint(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad" / "model.pt")
    assert export_main([str(tmp_path / "bad")]) == 2
    assert "refused" in capsys.readouterr().err


def test_torch_and_onnx_policies_agree_and_return_one_chunk(ckpt):
    export_onnx(ckpt)
    policies = [HeadPolicy.load(ckpt, backend="torch"), HeadPolicy.load(ckpt, backend="onnxruntime")]
    features, mask, state = (t[0].numpy() for t in example_inputs(policies[0].runtime.head, 1))
    chunks = []
    for policy in policies:
        policy.reset()
        chunk = policy.infer(features, mask, state)
        assert chunk.shape == (16, 8) and chunk.dtype == np.float32
        chunks.append(chunk)
    np.testing.assert_allclose(chunks[0], chunks[1], atol=1e-4)


def test_policy_refuses_inputs_outside_the_contract(ckpt):
    policy = HeadPolicy(TorchHeadRuntime.load(ckpt))
    n_layers, tokens, width = policy.config.contract.shape
    good = (np.zeros((n_layers, tokens, width)), np.ones(tokens, bool), np.zeros(8))
    with pytest.raises(ContractError, match="n_layers, T, D"):
        policy.infer(np.zeros((n_layers + 1, tokens, width)), good[1], good[2])
    with pytest.raises(ContractError, match="state"):
        policy.infer(good[0], good[1], np.zeros(7))
    with pytest.raises(ContractError, match="NaN"):
        policy.infer(np.full((n_layers, tokens, width), np.nan), good[1], good[2])


def test_onnx_runtime_checks_backbone_and_provider(ckpt):
    export_onnx(ckpt)
    with pytest.raises(CheckpointError, match="trained on backbone"):
        OnnxHeadRuntime(ckpt, backbone=("other-backbone", "00"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
            OnnxHeadRuntime(ckpt, device="cuda")


def test_onnx_without_head_metadata_is_refused(ckpt, tmp_path):
    export_onnx(ckpt)
    model = onnx.load(str(ckpt / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match="metadata"):
        OnnxHeadRuntime(tmp_path / "bare.onnx")


def test_stale_onnx_beside_a_changed_checkpoint_is_refused(ckpt, tmp_path):
    export_onnx(ckpt)
    other = _head("mol+skills")
    save_head(other, ckpt)  # new config.json, old model.onnx
    with pytest.raises(CheckpointError, match="re-run `m2vla export`"):
        HeadPolicy.load(ckpt, backend="onnxruntime")
