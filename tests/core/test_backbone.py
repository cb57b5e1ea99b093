"""Frozen VLM backbone: tiny offline models, the contract, the optimisations, frozenness."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from m2vla_core.backbone import FrozenBackbone, default_backbone_digest, default_backbone_path, weights_digest
from m2vla_core.backbone.adapter import pool_image_tokens
from m2vla_core.backbone.tiny import MANIFEST_NAME, make_tiny_vlm, recorded_digest
from m2vla_core.cli import main as cli
from m2vla_core.features import FeatureContract

INSTRUCTION = "pick up the red cube and place it on the blue tray"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Both families built fresh by the real command (qwen via the API, idefics3 via the CLI)."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    make_tiny_vlm(root / "qwen", family="qwen2_vl", seed=0)
    assert cli(["make-tiny-vlm", str(root / "idefics"), "--family", "idefics3", "--seed", "0"]) == 0
    return {"qwen2_vl": root / "qwen", "idefics3": root / "idefics"}


@pytest.fixture(scope="module")
def backbones(built) -> dict[str, FrozenBackbone]:
    return {family: FrozenBackbone.from_pretrained(path) for family, path in built.items()}


@pytest.fixture(params=["qwen2_vl", "idefics3"])
def bb(request, backbones) -> FrozenBackbone:
    return backbones[request.param]


def _image(seed: int = 0, shape=(224, 224, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_tiny_vlm_loads_back_through_from_pretrained_as_the_real_class(built, backbones):
    from transformers import Idefics3ForConditionalGeneration, Qwen2VLForConditionalGeneration

    expected = {"qwen2_vl": Qwen2VLForConditionalGeneration, "idefics3": Idefics3ForConditionalGeneration}
    for family, path in built.items():
        size_b = sum(p.stat().st_size for p in path.iterdir())
        assert size_b < 10e6
        assert (path / MANIFEST_NAME).is_file() and not list(path.glob("*.bin"))
        bb = backbones[family]
        assert type(bb.model) is expected[family]
        assert bb.weights_digest == recorded_digest(path) == weights_digest(path)
        assert bb.hidden_size == 128 and bb.num_layers >= 4
        assert bb.backbone_id.startswith(family)


def test_same_seed_builds_bit_identical_weights_and_another_seed_differs(built, tmp_path):
    make_tiny_vlm(tmp_path / "again", family="idefics3", seed=0)
    make_tiny_vlm(tmp_path / "other", family="idefics3", seed=1)
    assert weights_digest(tmp_path / "again") == weights_digest(built["idefics3"])
    assert weights_digest(tmp_path / "other") != weights_digest(built["idefics3"])


def test_shipped_default_backbone_is_small_and_matches_its_recorded_digest():
    path = default_backbone_path()
    assert sum(p.stat().st_size for p in path.iterdir()) < 10e6
    assert default_backbone_digest() == weights_digest(path)


def test_tampered_weights_are_refused_before_loading(built, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(built["idefics3"], copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        FrozenBackbone.from_pretrained(copy)


def test_pickle_only_checkpoint_is_refused(built, tmp_path):
    shutil.copy(built["idefics3"] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        FrozenBackbone.from_pretrained(tmp_path)


def test_extract_follows_the_contract_shapes_dtype_and_mask(bb):
    contract = bb.contract([0, 2, bb.num_layers], num_image_tokens=16, num_text_tokens=32, dtype="float16")
    bundle = bb.extract(_image(), INSTRUCTION, contract)
    assert tuple(bundle.hidden.shape) == (3, 16 + 32, bb.hidden_size)
    assert bundle.hidden.dtype == torch.float16 and bundle.mask.dtype == torch.bool
    n_instr = len(bb.tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
    assert 16 < 16 + n_instr < 48
    assert bundle.mask.sum().item() == 16 + n_instr
    assert bundle.mask[:16 + n_instr].all()
    assert torch.count_nonzero(bundle.hidden[:, 16 + n_instr:]) == 0  # padding is zero
    assert torch.isfinite(bundle.hidden).all()
    assert bundle.backbone_id == bb.backbone_id and bundle.instruction == INSTRUCTION and bundle.image_digest


def test_long_instruction_is_truncated_to_the_contract(bb):
    contract = bb.contract([1], num_text_tokens=3)
    bundle = bb.extract(_image(), INSTRUCTION, contract)
    assert bundle.mask.all() and bundle.hidden.shape[1] == bb.num_image_tokens_native + 3


def test_any_image_size_is_resized_and_features_depend_on_the_image(bb):
    contract = bb.contract([1])
    a = bb.extract(_image(1, (120, 333, 3)), INSTRUCTION, contract)
    b = bb.extract(_image(2, (480, 640, 3)), INSTRUCTION, contract)
    assert a.hidden.shape == b.hidden.shape
    n = contract.num_image_tokens
    assert not torch.allclose(a.hidden[:, :n], b.hidden[:, :n])


def test_layer_beyond_the_model_raises_naming_both(bb):
    contract = FeatureContract(layers=(1, bb.num_layers + 1), num_image_tokens=4, num_text_tokens=4, width=bb.hidden_size)
    with pytest.raises(ValueError, match=rf"layer {bb.num_layers + 1}.*{bb.num_layers} layers"):
        bb.extract(_image(), INSTRUCTION, contract)


def test_wrong_width_raises(bb):
    contract = FeatureContract(layers=(1,), num_image_tokens=4, num_text_tokens=4, width=bb.hidden_size + 1)
    with pytest.raises(ValueError, match="width"):
        bb.extract(_image(), INSTRUCTION, contract)


def test_a_contract_for_another_input_size_is_refused_naming_both_sizes(bb):
    wanted = bb.image_size * 2
    contract = FeatureContract(layers=(1,), num_image_tokens=4, num_text_tokens=4, width=bb.hidden_size,
                               image_size=wanted)
    with pytest.raises(ValueError, match=rf"{wanted} px.*loaded at {bb.image_size} px"):
        bb.extract(_image(), INSTRUCTION, contract)


def test_a_contract_naming_the_loaded_input_size_is_served(built):
    bb = FrozenBackbone.from_pretrained(built["qwen2_vl"], image_size=112)
    contract = FeatureContract(layers=(1,), num_image_tokens=16, num_text_tokens=4, width=bb.hidden_size,
                               image_size=112)
    assert bb.num_image_tokens_native == 16  # (112 / 28)^2: the token grid follows the input size
    assert bb.extract(_image(), INSTRUCTION, contract).hidden.shape == (1, 20, bb.hidden_size)


def test_a_view_at_another_input_size_shares_the_weights_and_equals_loading_at_that_size(built, backbones):
    bb = backbones["qwen2_vl"]
    view = bb.at_image_size(112)
    assert view.model is bb.model and view.image_size == 112 and bb.image_size == 224
    contract = FeatureContract(layers=(1, 2), num_image_tokens=16, num_text_tokens=4, width=bb.hidden_size,
                               image_size=112)
    loaded = FrozenBackbone.from_pretrained(built["qwen2_vl"], image_size=112)
    torch.testing.assert_close(view.extract(_image(), INSTRUCTION, contract).hidden,
                               loaded.extract(_image(), INSTRUCTION, contract).hidden)
    assert view.feature_identity == loaded.feature_identity != bb.feature_identity


def test_a_fixed_size_family_refuses_a_view_at_another_size(backbones):
    bb = backbones["idefics3"]
    with pytest.raises(ValueError, match="native image size"):
        bb.at_image_size(bb.image_size * 2)


def test_contract_image_size_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="image_size"):
        FeatureContract(layers=(1,), num_image_tokens=4, num_text_tokens=4, width=8, image_size=-1)


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), dtype=np.float32), "uint8"),
    (np.zeros((32, 32), dtype=np.uint8), "shape"),
    (np.zeros((32, 32, 4), dtype=np.uint8), "shape"),
    (np.zeros((0, 32, 3), dtype=np.uint8), "empty"),
    ([[0, 0, 0]], "numpy"),
])
def test_bad_images_raise_value_error(backbones, image, message):
    bb = backbones["qwen2_vl"]
    with pytest.raises(ValueError, match=message):
        bb.extract(image, INSTRUCTION, bb.contract([1]))


@pytest.mark.parametrize("instruction", ["", "   ", None, 42, "bad\x00char"])
def test_bad_instructions_raise_value_error(backbones, instruction):
    bb = backbones["qwen2_vl"]
    with pytest.raises(ValueError):
        bb.extract(_image(), instruction, bb.contract([1]))


def _reference_hidden_states(bb: FrozenBackbone, image: np.ndarray, instruction: str):
    """transformers' own forward with output_hidden_states on the same token layout."""
    from m2vla_core.backbone.adapter import _resize_square

    prefix, span = bb._prefix_ids(instruction)
    frame = bb._frame_ids()
    ids = torch.tensor([prefix + frame])
    frames = [_resize_square(image, bb.image_size)]
    with torch.no_grad():
        if bb.model_type.startswith("qwen"):
            px = bb.image_processor(images=frames, return_tensors="pt")
            out = bb.model(input_ids=ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                           mm_token_type_ids=(ids == bb.model.config.image_token_id).int(), output_hidden_states=True)
        else:
            px = bb.image_processor(images=[frames], return_tensors="pt", do_image_splitting=False)
            out = bb.model(input_ids=ids, pixel_values=px["pixel_values"],
                           pixel_attention_mask=px["pixel_attention_mask"], output_hidden_states=True)
    img_pos = [len(prefix) + i for i, t in enumerate(frame) if t == bb.model.config.image_token_id]
    return out.hidden_states, img_pos, span


def test_layer_loop_equals_transformers_forward_with_output_hidden_states(bb):
    image = _image(3)
    layers = tuple(range(bb.num_layers + 1))
    contract = bb.contract(layers, num_text_tokens=8)
    bundle = bb.extract(image, INSTRUCTION, contract, stop_at_deepest=False, reuse_instruction=False)
    ref, img_pos, (s0, _) = _reference_hidden_states(bb, image, INSTRUCTION)
    assert len(ref) == bb.num_layers + 1
    n = contract.num_image_tokens
    for j, layer in enumerate(layers):
        torch.testing.assert_close(bundle.hidden[j, :n], ref[layer][0, img_pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bundle.hidden[j, n:], ref[layer][0, s0:s0 + 8], atol=1e-5, rtol=1e-5)


def test_stop_at_deepest_layer_gives_the_full_forward_states_for_kept_layers(bb):
    contract = bb.contract([0, 1, 2])
    full = bb.extract(_image(4), INSTRUCTION, contract, stop_at_deepest=False, reuse_instruction=False)
    stopped = bb.extract(_image(4), INSTRUCTION, contract, stop_at_deepest=True, reuse_instruction=False)
    assert stopped.extra["layers_run"] == 2 and full.extra["layers_run"] == bb.num_layers
    torch.testing.assert_close(stopped.hidden, full.hidden, atol=0, rtol=0)


@pytest.mark.parametrize("stop", [True, False])
def test_instruction_prefix_reuse_equals_the_full_sequence(bb, stop):
    contract = bb.contract([0, 1, bb.num_layers - 1, bb.num_layers] if not stop else [1, 2], num_text_tokens=16)
    plain = [bb.extract(_image(s), INSTRUCTION, contract, stop_at_deepest=stop, reuse_instruction=False) for s in (5, 6)]
    hits = bb.prefix_hits
    reused = [bb.extract(_image(s), INSTRUCTION, contract, stop_at_deepest=stop, reuse_instruction=True) for s in (5, 6)]
    assert bb.prefix_hits >= hits + 1  # the second frame reused the instruction prefix
    for a, b in zip(plain, reused):
        torch.testing.assert_close(b.hidden, a.hidden, atol=2e-5, rtol=1e-4)
        assert torch.equal(a.mask, b.mask)


def test_batched_extract_equals_one_by_one(backbones):
    bb = backbones["qwen2_vl"]
    contract = bb.contract([1, 3], num_image_tokens=9, num_text_tokens=12)
    images = [_image(s) for s in (7, 8, 9)]
    texts = [INSTRUCTION, "push the green block left", INSTRUCTION]
    batch = bb.extract_batch(images, texts, contract, batch_size=2)
    for image, text, got in zip(images, texts, batch):
        single = bb.extract(image, text, contract)
        assert got.instruction == text
        torch.testing.assert_close(got.hidden, single.hidden, atol=2e-5, rtol=1e-4)


def test_backbone_stays_frozen_while_a_head_trains_on_its_features(backbones):
    bb = backbones["qwen2_vl"]
    bb.assert_frozen()
    before = bb.parameter_fingerprint()
    contract = bb.contract([1, bb.num_layers], num_text_tokens=8)
    bundle = bb.extract(_image(10), INSTRUCTION, contract)
    assert not bundle.hidden.requires_grad and bundle.hidden.grad_fn is None
    head = torch.nn.Linear(bb.hidden_size, 7)
    optim = torch.optim.SGD(list(head.parameters()) + list(bb.model.parameters()), lr=0.5)
    loss = head(bundle.hidden.float()).pow(2).mean()
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    optim.step()
    assert all(p.grad is None for p in bb.model.parameters())
    assert bb.parameter_fingerprint() == before
    bb.assert_frozen()


def test_assert_frozen_detects_an_unfrozen_parameter(backbones):
    bb = backbones["idefics3"]
    param = next(bb.model.parameters())
    param.requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="trainable"):
            bb.assert_frozen()
    finally:
        param.requires_grad_(False)


def test_pool_image_tokens_is_identity_at_native_size_and_mean_at_one_token():
    x = torch.randn(2, 16, 5)  # (B, N, D) on a 4x4 grid
    assert torch.equal(pool_image_tokens(x, (4, 4), 16), x)
    torch.testing.assert_close(pool_image_tokens(x, (4, 4), 1), x.mean(dim=1, keepdim=True))
    assert pool_image_tokens(x, (4, 4), 6).shape == (2, 6, 5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm"])
def test_sibling_families_load_and_match_transformers_with_and_without_reuse(family, tmp_path):
    bb = FrozenBackbone.from_pretrained(make_tiny_vlm(tmp_path / family, family=family))
    assert bb.model_type == family
    image = _image(11)
    contract = bb.contract(range(bb.num_layers + 1), num_text_tokens=4)
    plain = bb.extract(image, INSTRUCTION, contract, stop_at_deepest=False, reuse_instruction=False)
    reused = bb.extract(image, INSTRUCTION, contract, stop_at_deepest=False, reuse_instruction=True)
    torch.testing.assert_close(reused.hidden, plain.hidden, atol=2e-5, rtol=1e-4)
    ref, img_pos, (s0, _) = _reference_hidden_states(bb, image, INSTRUCTION)
    n = contract.num_image_tokens
    for j, layer in enumerate(contract.layers):
        torch.testing.assert_close(plain.hidden[j, :n], ref[layer][0, img_pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.hidden[j, n:], ref[layer][0, s0:s0 + 4], atol=1e-5, rtol=1e-5)
