"""Skill packs: save / load / combine round trip, routing on held-out seeds, refusal = no motion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from m2vla_core.heads.checkpoint import CheckpointError
from m2vla_core.packs import PackedPolicy, combine_packs, filter_feature_dataset, load_pack_info, with_min_confidence
from m2vla_core.policy_engine import INVALID_CHECKPOINT, PolicyEngine, PolicyLoadError
from m2vla_core.training.feature_dataset import FeatureDataset

PACKS = {"reach": ("reach_above",), "push": ("push_to_zone",)}  # as built by conftest.pack_dirs
ROUTER_MIN_ACCURACY = 0.9
HELD_OUT_SEEDS = 6  # per task, from 1000 (training demos use seeds 0..)


def _first_frames(feature_dir, task: str, n: int = 2):
    ds = FeatureDataset(feature_dir)
    t = list(ds.meta.task_names).index(task)
    rows = np.nonzero(ds.task_index == t)[0][:n]
    b = ds.batch(rows)
    return [(b["hidden"][i].numpy(), b["mask"][i].numpy(), b["state"][i].numpy()) for i in range(len(rows))]


def test_filtered_dataset_holds_only_the_packs_tasks(feature_dir, tmp_path):
    sub = filter_feature_dataset(feature_dir, tmp_path / "reach_only", ["reach_above"])
    full = FeatureDataset(feature_dir)
    reach = list(full.meta.task_names).index("reach_above")
    assert set(sub.task_index.tolist()) == {reach}
    assert len(sub) == int((full.task_index == reach).sum()) and sub.meta.contract == full.meta.contract


def test_pack_is_a_head_checkpoint_plus_pack_json_and_router_examples(pack_dirs):
    for name, tasks in PACKS.items():
        d = pack_dirs[name]
        info = load_pack_info(d)
        assert info.name == name and info.tasks == tasks and info.num_episodes == 8
        ex = load_file(str(d / "router_examples.safetensors"))
        assert ex["pooled"].shape == (8, 2, 2, 128)  # one first frame per episode, (L, image|text, D)
        assert sorted(p.name for p in d.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl")) == []


def test_combined_policy_reproduces_each_pack_alone_bit_for_bit(pack_dirs, pack_set, feature_dir):
    from m2vla_core.export.runtime import HeadPolicy

    packed = PackedPolicy.load(pack_set, backend="torch")
    assert packed.pack_names == ("reach", "push")
    assert json.loads((pack_set / "packs.json").read_text())["min_confidence"] == 0.6
    for name, tasks in PACKS.items():
        alone = HeadPolicy.load(pack_dirs[name], backend="torch")
        for hidden, mask, state in _first_frames(feature_dir, tasks[0]):
            packed.reset()
            chunk = packed.infer(hidden, mask, state)
            assert packed.routed_pack == name and packed.route_confidence >= 0.6
            np.testing.assert_array_equal(chunk, alone.infer(hidden, mask, state))


def test_pack_set_loads_with_onnxruntime_and_matches_torch(pack_set, feature_dir):
    hidden, mask, state = _first_frames(feature_dir, "push_to_zone", 1)[0]
    ort = PackedPolicy.load(pack_set, backend="onnxruntime")
    pt = PackedPolicy.load(pack_set, backend="torch")
    np.testing.assert_allclose(ort.infer(hidden, mask, state), pt.infer(hidden, mask, state), atol=1e-4)
    assert ort.routed_pack == pt.routed_pack == "push"


def test_routes_once_per_episode_and_reroutes_after_reset(pack_set, feature_dir):
    packed = PackedPolicy.load(pack_set, backend="torch")
    reach = _first_frames(feature_dir, "reach_above", 1)[0]
    push = _first_frames(feature_dir, "push_to_zone", 1)[0]
    packed.infer(*reach)
    packed.infer(*push)  # same episode: the pack chosen on the first observation stays
    assert packed.routed_pack == "reach"
    packed.reset()
    packed.infer(*push)
    assert packed.routed_pack == "push"


def test_named_task_skips_the_router(pack_set, feature_dir):
    packed = PackedPolicy.load(pack_set, backend="torch")
    packed.force_pack(packed.pack_for_task("push_to_zone"))
    packed.infer(*_first_frames(feature_dir, "reach_above", 1)[0])
    assert packed.routed_pack == "push" and packed.route_confidence == 1.0


def test_router_picks_the_right_pack_on_held_out_seeds(pack_set, backbone):
    from m2vla_core.packs.evaluation import router_accuracy

    result = router_accuracy(pack_set, episodes=HELD_OUT_SEEDS, seed_offset=1000, backbone=backbone, progress=False)
    assert set(result["per_task"]) == {"reach_above", "push_to_zone"}
    assert result["accuracy"] >= ROUTER_MIN_ACCURACY, result["confusion"]


def test_low_confidence_route_is_refused_with_a_reason_and_the_robot_does_not_move(pack_set, tmp_path, backbone):
    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.evaluation.rollout import RolloutConfig, run_episode
    from m2vla_core.sim import SimConfig, TaskEnv

    import torch

    from m2vla_core.packs import load_router, save_router

    strict = tmp_path / "unsure"
    shutil.copytree(pack_set, strict)
    router = load_router(strict / "router")
    with torch.no_grad():
        router.mlp[-1].weight.zero_()  # an undecided router: p = 1/2 for both packs, below min_confidence 0.6
        router.mlp[-1].bias.zero_()
    save_router(router, strict / "router")
    engine = PolicyEngine()
    engine.load(strict, backend="torch")
    with TaskEnv(SimConfig()) as env:
        obs = env.reset("reach_above", 1000)
        hidden, mask = backbone.extract(obs.image, obs.instruction, engine.contract).numpy()
        assert engine.infer(hidden, mask, obs.joint_positions.astype(np.float32), instruction_id=1) is None
        assert "not confident" in engine.refusal_reason and engine.routed_pack == ""
        # closed loop: a refused episode executes nothing
        q0 = env.joint_state()[0].copy()
        agent = VLAAgent(backbone, PackedPolicy.load(strict, backend="torch"))
        outcome = run_episode(env, agent, "reach_above", 1000, RolloutConfig(max_steps=20))
        assert outcome.steps == 0 and not outcome.success
        np.testing.assert_array_equal(env.joint_state()[0], q0)
        assert agent.policy.refusal_reason


def test_an_instruction_no_pack_was_trained_on_is_refused_although_the_router_names_a_pack(pack_set, tmp_path,
                                                                                         backbone):
    from m2vla_core.sim import SimConfig, TaskEnv

    auto = PackedPolicy.load(pack_set, backend="torch")
    threshold = json.loads((pack_set / "packs.json").read_text())["min_instruction_similarity"]
    assert 0.0 < threshold < 1.0 and auto.min_instruction_similarity == threshold  # calibrated at combine time
    # This fixture trains on only 16 distinct instructions, so the calibrated gate is loose: it stops
    # an unrelated request; set stricter (as measured for 80 demos per task, docs/packs_and_baselines.md)
    # it stops every uncovered task of the suite too.
    strict_dir = tmp_path / "strict"
    shutil.copytree(pack_set, strict_dir)
    config = json.loads((strict_dir / "packs.json").read_text())
    config["min_instruction_similarity"] = 0.95
    (strict_dir / "packs.json").write_text(json.dumps(config))
    strict = PackedPolicy.load(strict_dir, backend="torch")
    contract = auto.config.contract
    state = np.zeros(8, dtype=np.float32)

    def refused_as_unfamiliar(packed, image, instruction) -> bool:
        hidden, mask = backbone.extract(image, instruction, contract).numpy()
        assert packed.route(hidden, mask)[0] in PACKS  # the softmax always names some pack
        packed.reset()
        chunk = packed.infer(hidden, mask, state)
        return chunk is None and "unlike any the packs were trained on" in packed.refusal_reason

    with TaskEnv(SimConfig()) as env:
        obs = env.reset("reach_above", 0)  # a training instruction: both act on it
        for packed in (auto, strict):
            hidden, mask = backbone.extract(obs.image, obs.instruction, contract).numpy()
            assert packed.instruction_similarity_of(hidden, mask) > 0.999
            packed.reset()
            assert packed.infer(hidden, mask, state) is not None
        assert refused_as_unfamiliar(auto, obs.image, "wave hello to the camera")
        for task in ("pick_lift", "stack", "put_in_tray"):  # no pack covers these
            obs = env.reset(task, 1000)
            assert refused_as_unfamiliar(strict, obs.image, obs.instruction), (task, obs.instruction,
                                                                               strict.instruction_similarity)


def test_the_instruction_gate_can_be_switched_off_and_old_pack_sets_without_a_bank_still_load(pack_set, tmp_path,
                                                                                            backbone):
    from m2vla_core.packs.router import INSTRUCTIONS_NAME

    old = tmp_path / "old"
    shutil.copytree(pack_set, old)
    (old / "router" / INSTRUCTIONS_NAME).unlink()
    with pytest.raises(CheckpointError, match="no instruction bank"):
        PackedPolicy.load(old, backend="torch")  # packs.json still asks for the gate
    config = json.loads((old / "packs.json").read_text())
    config["min_instruction_similarity"] = 0.0
    (old / "packs.json").write_text(json.dumps(config))
    packed = PackedPolicy.load(old, backend="torch")
    hidden, mask = backbone.extract(np.zeros((224, 224, 3), np.uint8), "wave hello to the camera",
                                    packed.config.contract).numpy()
    assert np.isnan(packed.instruction_similarity_of(hidden, mask))
    packed.force_pack("reach")
    assert packed.infer(hidden, mask, np.zeros(8, dtype=np.float32)) is not None


def test_policy_engine_reports_the_routed_pack(pack_set, feature_dir):
    engine = PolicyEngine()
    engine.load(pack_set, backend="torch")
    hidden, mask, state = _first_frames(feature_dir, "push_to_zone", 1)[0]
    chunk = engine.infer(hidden, mask, state, instruction_id=7)
    assert chunk.shape == (engine.config.chunk_len, engine.config.action_dim)
    assert engine.routed_pack == "push" and 0.6 <= engine.route_confidence <= 1.0


def test_combine_refuses_packs_with_another_interface(pack_dirs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pack_dirs["push"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["dt_s"] = 0.05
    (other / "config.json").write_text(json.dumps(cfg))
    info = json.loads((other / "pack.json").read_text())
    info["name"], info["tasks"] = "push2", ["stack"]
    (other / "pack.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="dt_s"):
        combine_packs([pack_dirs["reach"], other], tmp_path / "set")


def test_combine_refuses_two_packs_claiming_one_task(pack_dirs, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(pack_dirs["reach"], twin)
    info = json.loads((twin / "pack.json").read_text())
    info["name"] = "reach2"
    (twin / "pack.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="both claim"):
        combine_packs([pack_dirs["reach"], twin], tmp_path / "set")


@pytest.mark.parametrize("damage", ["unknown_key", "pickle_router"])
def test_damaged_pack_set_is_refused_at_load(pack_set, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(pack_set, bad)
    if damage == "unknown_key":
        cfg = json.loads((bad / "packs.json").read_text())
        cfg["min_confidense"] = 0.5
        (bad / "packs.json").write_text(json.dumps(cfg))
    else:
        (bad / "router" / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a pickle header
    engine = PolicyEngine()
    with pytest.raises(PolicyLoadError) as err:
        engine.load(bad, backend="torch")
    assert err.value.code == INVALID_CHECKPOINT
    assert ("did you mean 'min_confidence'" in str(err.value)) if damage == "unknown_key" else "pickle" in str(err.value)


def test_threshold_can_be_changed_without_retraining(pack_set, tmp_path, feature_dir):
    copy = tmp_path / "copy"
    shutil.copytree(pack_set, copy)
    with_min_confidence(copy, 0.3)
    packed = PackedPolicy.load(copy, backend="torch")
    assert packed.min_confidence == 0.3
    assert packed.infer(*_first_frames(feature_dir, "reach_above", 1)[0]) is not None
