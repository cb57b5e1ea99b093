"""Actions-as-text baseline: codec round trip, LoRA touches only adapters, the probe tells them apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2vla_core.baselines.action_text import ActionTextCodec
from m2vla_core.baselines.configuration_text_policy import ActionTextConfig, TextTrainConfig
from m2vla_core.config_io import ConfigError, from_dict, to_dict

A, H = 8, 4


def _codec(num_bins: int = 100) -> ActionTextCodec:
    lo = tuple(float(v) for v in np.linspace(-0.3, -0.1, A))
    hi = tuple(float(v) for v in np.linspace(0.1, 0.4, A))
    return ActionTextCodec(ActionTextConfig(chunk_len=H, action_low=lo, action_high=hi, state_low=(-3.0,) * A,
                                            state_high=(3.0,) * A, num_bins=num_bins))


@pytest.mark.parametrize("num_bins", [10, 64, 100])
def test_action_text_round_trips_within_half_a_bin(num_bins):
    codec = _codec(num_bins)
    rng = np.random.default_rng(num_bins)
    c = codec.config
    for _ in range(50):
        state = rng.uniform(-2, 2, size=A).astype(np.float32)
        delta = rng.uniform(c.action_low, c.action_high, size=(H, A))
        chunk = state[None] + delta
        text = codec.encode(chunk, state)
        words = text.split()
        assert len(words) == H and all(len(w) == 2 * A and w.isdigit() for w in words)
        back, ok = codec.decode(text, state)
        assert ok and back.shape == (H, A)
        assert np.all(np.abs(back - chunk) <= codec.resolution / 2 + 1e-5)


def test_out_of_range_actions_clip_to_the_end_bins():
    codec = _codec()
    state = np.zeros(A, np.float32)
    far = np.full((H, A), 10.0)
    back, ok = codec.decode(codec.encode(far, state), state)
    assert ok and np.allclose(back, np.asarray(codec.config.action_high) - codec.resolution / 2, atol=1e-5)


def test_malformed_reply_holds_or_repeats_and_says_so():
    codec = _codec()
    state = np.linspace(-1, 1, A).astype(np.float32)
    held, ok = codec.decode("the robot says hello", state)
    assert not ok and np.array_equal(held, np.repeat(state[None], H, 0))
    one = codec.encode(state[None].repeat(H, 0) + 0.05, state).split()[0]
    partial, ok = codec.decode(one + " 12x", state)
    assert not ok and np.allclose(partial, partial[0][None])  # the one readable waypoint, repeated
    run_on, ok = codec.decode(one + "4242", state)  # no EOS after the word: its first 2A digits still count
    assert not ok and np.allclose(run_on, partial)


def test_codec_config_is_strict_json():
    cfg = _codec().config
    assert from_dict(ActionTextConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="did you mean"):
        from_dict(ActionTextConfig, {**to_dict(cfg), "num_binz": 3})
    with pytest.raises(ValueError, match="num_bins"):
        ActionTextConfig(chunk_len=H, action_low=(0.0,), action_high=(1.0,), state_low=(0.0,), state_high=(1.0,), num_bins=101)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two LoRA steps on a handful of synthetic (image, instruction, state, chunk) samples."""
    from m2vla_core.baselines.text_policy import load_base_model, train_text_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8), "push the red cube onto the blue zone",
                rng.uniform(-1, 1, size=A).astype(np.float32), rng.uniform(-1, 1, size=(H, A)).astype(np.float32))
               for _ in range(4)]
    base, _, _, _, _ = load_base_model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    out = tmp_path_factory.mktemp("text") / "policy"
    result = train_text_policy(samples, out, TextTrainConfig(steps=2, batch_size=2, lr=1e-2), progress=False)
    yield result, base_state, out
    torch.set_num_threads(threads)


def test_lora_trains_only_adapter_tensors_and_leaves_base_weights_untouched(trained):
    result, base_state, _ = trained
    model = result.policy.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert 0 < result.trainable_params < result.total_params / 5
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed, "two optimiser steps must move the (zero-initialised) LoRA B matrices"
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(base_now) == set(base_state)
    assert all(torch.equal(base_now[k], base_state[k]) for k in base_state)


def test_probe_is_identical_with_the_adapter_disabled_and_differs_with_it_active(trained):
    from m2vla_core.baselines.probe import lora_probe

    result, _, _ = trained
    probe = lora_probe(result.policy)
    assert probe["adapter_disabled"]["bit_identical"]
    assert not probe["adapter_active"]["bit_identical"] and probe["adapter_active"]["max_abs_logit_diff"] > 0
    assert not probe["adapter_merged"]["bit_identical"]


def test_text_policy_round_trips_through_safetensors_and_json(trained):
    from m2vla_core.baselines.probe import text_probe
    from m2vla_core.baselines.text_policy import TextActionPolicy

    result, _, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "text_policy.json"]
    loaded = TextActionPolicy.load(out)
    assert loaded.config == result.policy.config
    assert torch.equal(text_probe(loaded.model, loaded.tok).logits, text_probe(result.policy.model, result.policy.tok).logits)
    (out / "adapter.bin").write_bytes(b"\x80\x04\x95" + b"\0" * 32)
    with pytest.raises(Exception, match="pickle"):
        TextActionPolicy.load(out)
    (out / "adapter.bin").unlink()


def test_greedy_decoding_returns_a_full_chunk_even_from_an_untrained_model(trained):
    result, _, _ = trained
    rng = np.random.default_rng(1)
    state = rng.uniform(-1, 1, size=A).astype(np.float32)
    chunk, ok, n = result.policy.infer_chunk(rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8),
                                             "lift the red block", state)
    assert chunk.shape == (H, A) and np.isfinite(chunk).all() and 0 < n <= result.policy.max_new_tokens()


def test_frozen_mol_path_leaves_backbone_logits_bit_identical():
    from m2vla_core.baselines.probe import frozen_backbone_probe

    result = frozen_backbone_probe(feature_steps=2)
    assert result["bit_identical"] and result["fingerprint_unchanged"] and result["max_abs_logit_diff"] == 0.0
