"""Head checkpoints: safetensors + strict JSON only; every unsafe or damaged input is refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from m2vla_core.heads import CheckpointError, PolicyHead, load_head, save_head
from m2vla_core.heads.factory import small_head_config


class _Booby:
    """Unpickling this creates a directory: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _trained_like_head(preset: str = "mol+msm", seed: int = 0) -> PolicyHead:
    torch.manual_seed(seed)
    cfg = small_head_config(preset)
    head = PolicyHead(cfg)
    head.normalizer.set_stats(np.full(8, 0.1), np.full(8, 2.0), np.full(8, -0.3), np.full(8, 0.5))
    head.normalizer.set_action_range(np.full(8, -0.6), np.full(8, 0.1))
    if head.uses_memory:
        head.action_head.memory.set(torch.randn(40, cfg.contract.width + 8), torch.randn(40, 16, 8), torch.arange(40) // 5)
    return head.eval()


def _inputs(head: PolicyHead, batch: int = 2):
    n_layers, tokens, width = head.config.contract.shape
    return torch.randn(batch, n_layers, tokens, width), torch.ones(batch, tokens, dtype=torch.bool), torch.randn(batch, 8)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_head(_trained_like_head(), tmp_path / "head")


@pytest.mark.parametrize("preset", ["mol+msm", "mol+skills", "last+mlp"])
def test_round_trip_gives_identical_chunks(tmp_path, preset):
    head = _trained_like_head(preset)
    save_head(head, tmp_path / preset)
    loaded = load_head(tmp_path / preset)
    x = _inputs(head)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), head(*x), rtol=0, atol=0)
    assert loaded.config == head.config
    if head.uses_memory:
        assert loaded.action_head.memory.size == 40
        torch.testing.assert_close(loaded.action_head.memory.values, head.action_head.memory.values)
    assert sorted(p.name for p in (tmp_path / preset).iterdir()) == ["config.json", "model.safetensors"]


def test_pickle_weights_are_refused_without_unpickling(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(_Booby(marker), protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_head(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("pickle_like_length", [0x380, 0x580])  # starts 80 03 / 80 05: a pickle's protocol marker
def test_a_safetensors_file_whose_header_length_looks_like_a_pickle_marker_is_read(tmp_path, pickle_like_length):
    from m2vla_core.heads.checkpoint import check_safetensors_file, sniff_weights_format

    path = tmp_path / "frames.safetensors"
    for pad in range(2000):  # the header grows with the metadata; the writer pads it to 8 bytes
        save_file({"x": torch.arange(4.0)}, str(path), metadata={"note": "p" * pad})
        if int.from_bytes(path.read_bytes()[:8], "little") == pickle_like_length:
            break
    assert path.read_bytes()[:2] == pickle_like_length.to_bytes(2, "little")
    assert sniff_weights_format(path) == "safetensors"
    check_safetensors_file(path)  # no CheckpointError
    torch.testing.assert_close(load_file(str(path))["x"], torch.arange(4.0))


def test_torch_zip_weights_are_refused(ckpt):
    torch.save({"w": torch.zeros(2)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle-format weights are refused"):
        load_head(ckpt)


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "extra.pkl"])
def test_a_pickle_file_beside_the_checkpoint_is_refused(ckpt, name, tmp_path):
    marker = tmp_path / "pwned"
    (ckpt / name).write_bytes(pickle.dumps(_Booby(marker)))
    with pytest.raises(CheckpointError, match="pickle-format weights are refused"):
        load_head(ckpt)
    assert not marker.exists()


def test_truncated_safetensors_is_refused(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_head(ckpt)


def test_unknown_config_key_is_refused_with_a_suggestion(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["chunk_lenn"] = 16
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="did you mean 'chunk_len'"):
        load_head(ckpt)


def test_unknown_nested_config_key_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["arch"]["msm"]["topk"] = 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="topk"):
        load_head(ckpt)


def test_missing_normalisation_stats_are_refused(ckpt):
    path = ckpt / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("normalizer.action")}
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="missing normalisation stats"):
        load_head(ckpt)


def test_a_checkpoint_saved_before_the_action_range_runs_unbounded_with_a_warning(ckpt, caplog):
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    for key in ("normalizer.action_low", "normalizer.action_high"):
        del state[key]
    save_file(state, str(weights))
    with caplog.at_level("WARNING"):
        head = load_head(ckpt)
    assert "demonstrated action range" in caplog.text
    assert bool(torch.isinf(head.normalizer.action_low).all() and torch.isinf(head.normalizer.action_high).all())
    del state["normalizer.fitted"]  # the legacy path spares only the range, nothing else
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="normalizer.fitted"):
        load_head(ckpt)


def test_half_an_action_range_is_refused(ckpt):
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    del state["normalizer.action_high"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="normalizer.action_high"):
        load_head(ckpt)


def test_shape_mismatch_names_the_tensor(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["arch"]["mol"]["router_hidden"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor .mol\.router\.0\.(weight|bias). has shape"):
        load_head(ckpt)


def test_head_of_another_backbone_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    load_head(ckpt, backbone=(cfg["backbone_id"], cfg["backbone_digest"]))
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_head(ckpt, backbone=(cfg["backbone_id"], "cd" * 32))


def test_saving_without_statistics_or_memory_is_refused(tmp_path):
    head = PolicyHead(small_head_config("mol+msm"))
    with pytest.raises(CheckpointError, match="normalisation"):
        save_head(head, tmp_path / "a")
    head.normalizer.set_stats(np.zeros(8), np.ones(8), np.zeros(8), np.ones(8))
    with pytest.raises(CheckpointError, match="empty skill memory"):
        save_head(head, tmp_path / "b")


def test_missing_directory_and_config_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_head(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_head(tmp_path / "empty")
