"""The head's arm-aware options. Gripper features: forward kinematics from the URDF, equal to
PyBullet's, computed inside the head (trained with their statistics, saved, exported to ONNX) from
the state it gets. Relative actions: the layers predict offsets from the current joints, the head
still emits absolute targets. The grasp-point loss: errors counted where they put the gripper."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from m2vla_core.heads import load_head
from m2vla_core.heads.factory import build_head, small_head_config
from m2vla_core.heads.gripper_geometry import (
    PANDA_ARM_JOINTS, ForwardKinematics, build_gripper_features, chain_from_urdf, panda_chain,
)
from m2vla_core.kinematics import PandaKinematics
from m2vla_core.robot_model import panda_urdf_path
from m2vla_core.sim.tasks import PRIVILEGED_STATE_NAMES
from m2vla_core.training.feature_dataset import FeatureDataset, FeatureDatasetMeta, FeatureDatasetWriter
from m2vla_core.training.trainer import RunConfig, TrainConfig, grasp_point_error_cm, train

ACTION_NAMES = (*PANDA_ARM_JOINTS, "gripper_opening")
STATE_NAMES = (*ACTION_NAMES, *PRIVILEGED_STATE_NAMES)
HOME = np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8])


@pytest.fixture(scope="module")
def pybullet_fk():
    kinematics = PandaKinematics()
    yield kinematics.end_effector_positions
    kinematics.close()


def _random_arm(n: int, seed: int = 0) -> np.ndarray:
    return HOME + np.random.default_rng(seed).uniform(-0.8, 0.8, size=(n, 7))


def test_forward_kinematics_puts_the_gripper_where_pybullet_does(pybullet_fk):
    q = _random_arm(64)
    ours = ForwardKinematics(panda_chain())(torch.as_tensor(q, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours, pybullet_fk(q), atol=1e-5)


def test_a_chain_must_move_exactly_the_named_revolute_joints():
    with pytest.raises(ValueError, match="panda_finger_joint1"):  # a prismatic finger on the way to the tip
        chain_from_urdf(panda_urdf_path(), PANDA_ARM_JOINTS, "panda_leftfinger")
    with pytest.raises(ValueError, match="expected the revolute joints"):
        chain_from_urdf(panda_urdf_path(), PANDA_ARM_JOINTS[:6], "panda_grasptarget")
    with pytest.raises(ValueError, match="no joint leads"):
        chain_from_urdf(panda_urdf_path(), PANDA_ARM_JOINTS, "no_such_link")


def test_the_features_are_the_gripper_and_the_vectors_from_it_to_the_named_objects(pybullet_fk):
    q = _random_arm(8, seed=1)
    objects = np.random.default_rng(2).uniform(-0.3, 0.7, size=(8, 4))
    state = torch.as_tensor(np.c_[q, np.full(8, 0.04), objects], dtype=torch.float32)
    features = build_gripper_features("panda", STATE_NAMES)(state).numpy()
    gripper = pybullet_fk(q)
    np.testing.assert_allclose(features[:, :3], gripper, atol=1e-5)
    np.testing.assert_allclose(features[:, 3:5], objects[:, :2] - gripper[:, :2], atol=1e-5)
    np.testing.assert_allclose(features[:, 5:7], objects[:, 2:] - gripper[:, :2], atol=1e-5)
    joints_only = build_gripper_features("panda", STATE_NAMES[:8])(state[:, :8]).numpy()
    np.testing.assert_allclose(joints_only, gripper, atol=1e-5)  # no objects in the state: the gripper alone


def test_a_head_with_gripper_features_needs_the_arms_joints_named_first():
    config = small_head_config("mol+msm", state_dim=8)
    arch = dataclasses.replace(config.arch, gripper_features="panda")
    with pytest.raises(ValueError, match="needs the state's names"):
        dataclasses.replace(config, arch=arch)
    renamed = dataclasses.replace(config, arch=arch, state_names=("gripper_opening", *PANDA_ARM_JOINTS))
    with pytest.raises(ValueError, match="must be"):
        build_head(renamed)
    with pytest.raises(ValueError, match="gripper_features must be one of"):
        dataclasses.replace(config.arch, gripper_features="ur5")


def _run(**arch_options) -> RunConfig:
    arch = dataclasses.replace(small_head_config("mol+msm").arch, **arch_options)
    return RunConfig(arch=arch, train=TrainConfig(steps=3, batch_size=16, val_fraction=0.25, val_every=3,
                                                  ckpt_every=1000, warmup_steps=1), preset="mol+msm")


@pytest.fixture(scope="module")
def panda_data(tmp_path_factory):
    """A small feature dataset whose state is the Panda's joints + gripper + named objects' x, y."""
    config = small_head_config("mol+msm", state_dim=len(STATE_NAMES))
    meta = FeatureDatasetMeta(contract=config.contract, state_dim=len(STATE_NAMES), action_space="joint", action_dim=8,
                              chunk_len=16, dt_s=0.1, backbone_id="test-backbone", backbone_digest="ab" * 32,
                              state_names=STATE_NAMES, action_names=ACTION_NAMES)
    rng = np.random.default_rng(3)
    n_layers, tokens, width = config.contract.shape
    path = tmp_path_factory.mktemp("panda") / "data"
    with FeatureDatasetWriter(path, meta) as writer:
        for episode in range(8):
            n = 12
            arm = _random_arm(n, seed=10 + episode)
            state = np.c_[arm, np.full(n, 0.04), np.tile(rng.uniform(0.3, 0.6, size=4), (n, 1))].astype(np.float32)
            actions = np.repeat(state[:, None, :8], 16, axis=1) + 0.01 * rng.normal(size=(n, 16, 8)).astype(np.float32)
            writer.add(rng.normal(size=(n, n_layers, tokens, width)).astype(np.float32), np.ones((n, tokens), bool),
                       state, actions.astype(np.float32), np.full(n, episode), np.zeros(n, dtype=np.int64))
    return path


def test_training_normalises_the_gripper_features_and_the_head_saves_and_exports_them(panda_data, tmp_path, pybullet_fk):
    from m2vla_core.export.onnx_export import export_onnx

    train(panda_data, tmp_path / "ckpt", _run(gripper_features="panda"), progress=False, plot=False)
    head = load_head(tmp_path / "ckpt")
    data = FeatureDataset(panda_data)
    train_idx, _ = data.split_by_episode(0.25, seed=0)
    states = data.state[train_idx].numpy()
    gripper = pybullet_fk(states[:, :7])
    s = len(STATE_NAMES)
    assert head.normalizer.state_mean.shape == (s + 7,)
    np.testing.assert_allclose(head.normalizer.state_mean[s:s + 3].numpy(), gripper.mean(0), atol=1e-4)
    np.testing.assert_allclose(head.normalizer.state_mean[s + 3:s + 5].numpy(),
                               (states[:, 8:10] - gripper[:, :2]).mean(0), atol=1e-4)
    # The layers read the features: a gripper point moved along the hand moves the chunk.
    batch = data.batch(train_idx[:4])
    before = head(batch["hidden"], batch["mask"], batch["state"])
    head.gripper_features.kinematics.tip.zero_()
    assert not torch.allclose(before, head(batch["hidden"], batch["mask"], batch["state"]))
    result = export_onnx(tmp_path / "ckpt")  # the exported graph computes them too
    assert result.ok and result.max_abs_error is not None and result.max_abs_error < 1e-4


def test_relative_actions_need_a_state_that_begins_with_the_actions_quantities():
    config = dataclasses.replace(small_head_config("mol+msm", state_dim=len(STATE_NAMES)), state_names=STATE_NAMES,
                                 action_names=ACTION_NAMES)
    dataclasses.replace(config, arch=dataclasses.replace(config.arch, relative_actions=True))  # accepted
    shuffled = (*STATE_NAMES[1:8], STATE_NAMES[0], *STATE_NAMES[8:])
    with pytest.raises(ValueError, match="relative_actions"):
        dataclasses.replace(config, state_names=shuffled, arch=dataclasses.replace(config.arch, relative_actions=True))


def test_a_relative_head_learns_offsets_from_the_joints_and_emits_absolute_targets(panda_data, tmp_path):
    """Offsets for the arm's joints only: a gripper closed on a cube reads 5 cm open, and "its
    offset" would command a negative opening once the cube is gone (the controller refuses it)."""
    from m2vla_core.export.onnx_export import export_onnx

    train(panda_data, tmp_path / "ckpt", _run(relative_actions=True), progress=False, plot=False)
    head = load_head(tmp_path / "ckpt")
    data = FeatureDataset(panda_data)
    train_idx, _ = data.split_by_episode(0.25, seed=0)
    origin = data.state[train_idx, None, :8].clone()
    origin[..., 7] = 0.0  # the gripper stays absolute: commanded open or closed, held apart by a cube
    offsets = data.actions[train_idx] - origin  # (N, H, A)
    np.testing.assert_allclose(head.normalizer.action_mean.numpy(), offsets.mean((0, 1)).numpy(), atol=1e-5)
    batch = data.batch(train_idx[:4])
    with torch.no_grad():
        layers = head.normalizer.denormalize_action(head.forward_normalized(batch["hidden"], batch["mask"], batch["state"]))
        chunk = head(batch["hidden"], batch["mask"], batch["state"])
    torch.testing.assert_close(chunk[..., :7], layers[..., :7] + batch["state"][:, None, :7])
    torch.testing.assert_close(chunk[..., 7], layers[..., 7])
    # The skill prior is made of normalised offsets too (absolute angles in those units: ~100).
    assert float(head.action_head.memory.values.abs().mean()) < 5.0
    result = export_onnx(tmp_path / "ckpt")
    assert result.ok and result.max_abs_error < 1e-4


def test_a_relative_heads_chunk_stays_inside_the_demonstrated_range_in_torch_and_onnx(panda_data, tmp_path):
    """Offsets added to a joint near the edge of what was demonstrated could carry it past a limit;
    the controller would then refuse every chunk and the arm would hold for good."""
    from m2vla_core.export.onnx_export import export_onnx
    from m2vla_core.export.runtime import OnnxHeadRuntime

    train(panda_data, tmp_path / "ckpt", _run(relative_actions=True), progress=False, plot=False)
    head = load_head(tmp_path / "ckpt")
    data = FeatureDataset(panda_data)
    train_idx, _ = data.split_by_episode(0.25, seed=0)
    demonstrated = data.actions[train_idx].flatten(0, 1)  # (N * H, A) absolute
    torch.testing.assert_close(head.normalizer.action_low, demonstrated.min(0).values)
    torch.testing.assert_close(head.normalizer.action_high, demonstrated.max(0).values)

    batch = data.batch(train_idx[:4])
    state = batch["state"].clone()
    state[:, 3] = head.normalizer.action_low[3] - 0.3  # joint 4 beyond anything demonstrated
    with torch.no_grad():
        unbounded = head.normalizer.denormalize_action(head.forward_normalized(batch["hidden"], batch["mask"], state))
        unbounded = unbounded + head.action_origin(state)
        chunk = head(batch["hidden"], batch["mask"], state)
    assert float(unbounded[..., 3].min()) < float(head.normalizer.action_low[3])  # the offsets alone overshoot
    assert bool(((chunk >= head.normalizer.action_low) & (chunk <= head.normalizer.action_high)).all())
    inside = (unbounded >= head.normalizer.action_low) & (unbounded <= head.normalizer.action_high)
    torch.testing.assert_close(chunk[inside], unbounded[inside])  # only what overshoots is moved

    assert export_onnx(tmp_path / "ckpt").ok
    onnx_chunk = OnnxHeadRuntime(tmp_path / "ckpt").infer(batch["hidden"].numpy(), batch["mask"].numpy(), state.numpy())
    np.testing.assert_allclose(onnx_chunk, chunk.numpy(), atol=1e-4)


def test_the_range_lets_nan_through_for_the_controller_to_refuse():
    head = build_head(small_head_config("mol+mlp"))
    head.normalizer.set_action_range(np.full(8, -1.0), np.full(8, 1.0))
    clamped = head.normalizer.clamp_action(torch.tensor([[[float("nan"), 5.0, -5.0, 0.5, 0, 0, 0, 0]]]))
    assert torch.isnan(clamped[0, 0, 0]) and clamped[0, 0, 1:4].tolist() == [1.0, -1.0, 0.5]
    with pytest.raises(ValueError, match="low .* above high"):
        head.normalizer.set_action_range(np.ones(8), np.zeros(8))
    with pytest.raises(ValueError, match="finite"):
        head.normalizer.set_action_range(np.full(8, -np.inf), np.ones(8))


def _panda_head():
    config = dataclasses.replace(small_head_config("mol+msm", state_dim=len(STATE_NAMES)), state_names=STATE_NAMES,
                                 action_names=ACTION_NAMES)
    return build_head(dataclasses.replace(config, arch=dataclasses.replace(config.arch, gripper_features="panda")))


def test_the_grasp_point_error_counts_where_the_waypoints_put_the_gripper(pybullet_fk):
    """A shoulder error moves the fingertips far more than a wrist roll of the same size, which a
    joint-space loss weighs alike; the gripper's opening is not a position."""
    head = _panda_head()  # unfitted normaliser (mean 0, std 1) and absolute actions: normalised == absolute
    arm = _random_arm(4 * 16, seed=5)
    demonstrated = torch.as_tensor(np.c_[arm, np.full(len(arm), 0.04)], dtype=torch.float32).reshape(4, 16, 8)
    state = torch.zeros(4, len(STATE_NAMES))
    assert float(grasp_point_error_cm(head, demonstrated, demonstrated, state)) == 0.0

    def error_cm(joint: int, delta: float) -> float:
        pred = demonstrated.clone()
        pred[..., joint] += delta
        return float(grasp_point_error_cm(head, pred, demonstrated, state))

    shoulder, wrist_roll, gripper = error_cm(1, 0.02), error_cm(6, 0.02), error_cm(7, 0.02)
    moved = arm.copy()
    moved[:, 1] += 0.02
    expected = np.abs(pybullet_fk(moved) - pybullet_fk(arm)).mean() * 100.0
    assert shoulder == pytest.approx(expected, rel=1e-3)  # per-axis mean [cm], by PyBullet's kinematics
    assert shoulder > 0.3 and shoulder > 50 * wrist_roll  # the grasp point sits on the wrist's axis
    assert gripper == 0.0


def test_the_grasp_point_loss_needs_the_grippers_kinematics_and_a_sane_weight():
    with pytest.raises(ValueError, match="gripper_features"):
        RunConfig(arch=small_head_config("mol+msm").arch, train=TrainConfig(grasp_point_weight=0.3))
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="grasp_point_weight"):
            TrainConfig(grasp_point_weight=bad)


def test_training_reports_the_grasp_point_error_and_learns_from_it_when_weighted(panda_data, tmp_path):
    """Every head with the gripper's kinematics gets the held-out grasp-point error in its history;
    the weight changes what is learnt, and the action loss reported stays the action loss alone."""
    runs = {}
    for weight in (0.0, 5.0):
        run = _run(gripper_features="panda")
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, grasp_point_weight=weight))
        runs[weight] = train(panda_data, tmp_path / f"w{weight}", run, progress=False, plot=False)
    for result in runs.values():
        assert [step for step, _ in result.val_grasp_point_cm] == [step for step, _ in result.val_loss]
        assert all(np.isfinite(cm) and cm > 0 for _, cm in result.val_grasp_point_cm)
    assert runs[0.0].train_loss[0] == runs[5.0].train_loss[0]  # same first batch, same action loss
    assert runs[0.0].train_loss[-1] != runs[5.0].train_loss[-1]  # the weighted run's steps went elsewhere
    plain = train(panda_data, tmp_path / "plain", _run(), progress=False, plot=False)
    assert plain.val_grasp_point_cm == []  # no kinematics, nothing to report
