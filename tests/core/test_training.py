"""Feature dataset format, trainer (normalisation, memory, validation, exact resume) and CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from m2vla_core.heads import load_head
from m2vla_core.heads.factory import small_head_config
from m2vla_core.training.cli import train_main
from m2vla_core.training.feature_dataset import DatasetError, FeatureDataset, FeatureDatasetMeta, FeatureDatasetWriter
from m2vla_core.training.synthetic import write_synthetic_dataset
from m2vla_core.training.trainer import RunConfig, TrainConfig, aux_rmse, train

CONTRACT = small_head_config().contract


def _run(preset: str = "mol+msm", steps: int = 60, aux_weight: float = 0.0, **train_kw) -> RunConfig:
    arch = dataclasses.replace(small_head_config(preset).arch, aux_weight=aux_weight)
    cfg = dict(steps=steps, batch_size=32, lr=2e-3, warmup_steps=5, val_fraction=0.25, val_every=20, ckpt_every=1000)
    cfg.update(train_kw)
    return RunConfig(arch=arch, train=TrainConfig(**cfg), preset=preset)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("features") / "data"
    write_synthetic_dataset(path, contract=CONTRACT, num_episodes=12, episode_len=24, shard_size=100)
    return path


def _meta(**kw) -> FeatureDatasetMeta:
    fields = dict(contract=CONTRACT, state_dim=8, action_space="joint", action_dim=8, chunk_len=16, dt_s=0.1,
                  backbone_id="b", backbone_digest="d")
    return FeatureDatasetMeta(**{**fields, **kw})


def test_dataset_round_trip_in_shards(data_dir):
    ds = FeatureDataset(data_dir)
    assert len(ds) == 12 * 24 and ds.meta.num_episodes == 12 and len(ds.meta.shards) == 3
    assert ds.hidden.dtype == torch.float16 and ds.hidden.shape == (288, *CONTRACT.shape)
    batch = ds.batch([0, 5, 287])
    assert batch["hidden"].dtype == torch.float32 and batch["mask"].dtype == torch.bool
    assert batch["actions"].shape == (3, 16, 8) and batch["episode_index"].tolist() == [0, 0, 11]
    assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".tmp") == []


def test_split_keeps_whole_episodes_apart(data_dir):
    ds = FeatureDataset(data_dir)
    train_idx, val_idx = ds.split_by_episode(0.25, seed=3)
    train_eps, val_eps = set(ds.episode_index[train_idx]), set(ds.episode_index[val_idx])
    assert len(val_eps) == 3 and not train_eps & val_eps
    assert len(train_idx) + len(val_idx) == len(ds)


def test_writer_single_samples_append_and_shape_checks(tmp_path):
    path = tmp_path / "ds"
    n_layers, tokens, width = CONTRACT.shape
    with FeatureDatasetWriter(path, _meta(hidden_dtype="float32")) as w:
        for t in range(3):
            w.add(np.ones((n_layers, tokens, width)), np.ones(tokens, bool), np.zeros(8), np.zeros((16, 8)), 7, 1)
        with pytest.raises(DatasetError, match=r"hidden shaped \(1, 3, 8, 16\)"):
            w.add(np.ones((n_layers, tokens, 16)), np.ones(tokens, bool), np.zeros(8), np.zeros((16, 8)), 7, 1)
    with FeatureDatasetWriter(path, _meta(hidden_dtype="float32"), append=True) as w:
        w.add(np.ones((2, n_layers, tokens, width)), np.ones((2, tokens), bool), np.zeros((2, 8)), np.zeros((2, 16, 8)),
              [8, 8], [0, 0])
    ds = FeatureDataset(path)
    assert len(ds) == 5 and ds.meta.num_episodes == 2 and ds.hidden.dtype == torch.float32
    with pytest.raises(DatasetError, match="already holds a dataset"):
        FeatureDatasetWriter(path, _meta())
    with pytest.raises(DatasetError, match="differs"):
        FeatureDatasetWriter(path, _meta(hidden_dtype="float32", dt_s=0.2), append=True)


def test_damaged_dataset_is_reported(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        FeatureDataset(copy)


# The MSM starts from its retrieved prior (already a decent guess), so it has less to gain.
@pytest.mark.parametrize("preset,factor", [("mol+msm", 0.85), ("mol+mlp", 0.7)])
def test_training_lowers_validation_loss(data_dir, tmp_path, preset, factor):
    result = train(data_dir, tmp_path / "ckpt", _run(preset, steps=60, lr=5e-3), progress=False)
    (step0, val0), (step_n, val_n) = result.val_loss[0], result.val_loss[-1]
    assert (step0, step_n) == (0, 60)
    assert val_n < factor * val0, result.val_loss
    head = load_head(tmp_path / "ckpt")  # the output is a loadable head
    assert (tmp_path / "ckpt" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if head.uses_memory:
        assert 0 < head.action_head.memory.size <= head.config.arch.msm.memory_size
        train_eps = set(FeatureDataset(data_dir).episode_index[FeatureDataset(data_dir).split_by_episode(0.25, 0)[0]])
        assert set(head.action_head.memory.episodes.tolist()) <= train_eps  # memory from the train split only


def test_normalisation_stats_come_from_the_train_split(data_dir, tmp_path):
    train(data_dir, tmp_path / "ckpt", _run("mol+mlp", steps=1), progress=False, plot=False)
    head = load_head(tmp_path / "ckpt")
    ds = FeatureDataset(data_dir)
    train_idx, _ = ds.split_by_episode(0.25, seed=0)
    np.testing.assert_allclose(head.normalizer.action_mean.numpy(), ds.actions[train_idx].mean((0, 1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(head.normalizer.state_std.numpy(), ds.state[train_idx].std(0, unbiased=False).numpy(),
                               rtol=1e-4)


def test_resume_continues_from_the_same_step_with_the_same_result(data_dir, tmp_path):
    run = _run("mol+msm", steps=20, val_every=5, ckpt_every=1000)
    straight = train(data_dir, tmp_path / "straight", run, progress=False, plot=False)
    first = train(data_dir, tmp_path / "resumed", run, progress=False, plot=False, stop_after=10)
    assert first.step == 10
    assert json.loads((tmp_path / "resumed" / "train.json").read_text())["step"] == 10
    second = train(data_dir, tmp_path / "resumed", run, resume=True, progress=False, plot=False)
    assert second.step == 20
    assert [s for s, _ in second.train_loss] == list(range(1, 21))
    np.testing.assert_allclose([l for _, l in second.train_loss], [l for _, l in straight.train_loss], rtol=1e-6)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_resume_refuses_a_changed_config_and_fresh_run_refuses_an_existing_checkpoint(data_dir, tmp_path):
    train(data_dir, tmp_path / "c", _run("mol+mlp", steps=2), progress=False, plot=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(data_dir, tmp_path / "c", _run("mol+mlp", steps=2), progress=False, plot=False)
    with pytest.raises(ValueError, match="different config"):
        train(data_dir, tmp_path / "c", _run("mol+mlp", steps=4, lr=1e-2), resume=True, progress=False, plot=False)


def test_gradient_reaches_only_head_parameters(data_dir, tmp_path):
    """Features are inputs (the backbone is frozen elsewhere); the normaliser and the skill
    memory are buffers: a training step moves head weights and nothing else."""
    train(data_dir, tmp_path / "c", _run("mol+msm", steps=1), progress=False, plot=False)
    head = load_head(tmp_path / "c").train()
    names = [n for n, _ in head.named_parameters()]
    assert not [n for n in names if n.startswith("normalizer") or ".memory." in n]
    buffers = {k: v.clone() for k, v in head.named_buffers()}
    params = {k: v.clone() for k, v in head.named_parameters()}
    ds = FeatureDataset(data_dir)
    batch = ds.batch(np.arange(32))
    features = batch["hidden"].requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = head.forward_normalized(features, batch["mask"], batch["state"], exclude_episode=batch["episode_index"]).square().mean()
    loss.backward()
    missing_grad = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing_grad
    assert features.grad is None
    opt.step()
    for k, v in head.named_buffers():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    assert any(not torch.equal(p, params[n]) for n, p in head.named_parameters())


def test_cli_trains_with_a_preset_and_refuses_unknown_presets(data_dir, tmp_path, capsys):
    code = train_main(["--data", str(data_dir), "--out", str(tmp_path / "cli"), "--config", "mol+skills", "--steps", "3",
                       "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "trained to step 3" in capsys.readouterr().out
    assert load_head(tmp_path / "cli").config.arch.action_head == "skills"
    code = train_main(["--data", str(data_dir), "--out", str(tmp_path / "cli2"), "--config", "mol+mps", "--steps", "1"])
    assert code == 2
    assert "did you mean 'mol+msm'" in capsys.readouterr().err


def test_cli_reads_a_json_run_config_strictly(data_dir, tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"arch": {"action_head": "mlp", "d_model": 32, "mol": {"mix": "uniform", "num_queries": 2}},
                               "train": {"batch_size": 8}}))
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "j"), "--config", str(cfg), "--steps", "2",
                       "--no-progress"]) == 0
    assert load_head(tmp_path / "j").config.arch.mol.mix == "uniform"
    cfg.write_text(json.dumps({"train": {"batch_sise": 8}}))
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "k"), "--config", str(cfg)]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    missing = tmp_path / "no_such_run.json"
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "m"), "--config", str(missing)]) == 2
    assert f"{missing}: cannot read the config file" in capsys.readouterr().err


def test_cli_resume_reuses_the_runs_own_config(data_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train_main(["--data", str(data_dir), "--out", out, "--config", "last+mlp", "--steps", "4", "--stop-after", "2",
                       "--no-progress"]) == 0
    assert train_main(["--data", str(data_dir), "--out", out, "--resume", "--no-progress"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert load_head(out).config.arch.mol.mix == "last"


# -- auxiliary targets: what a head is taught to predict besides its actions, never reads --------
@pytest.fixture(scope="module")
def aux_data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("features_aux") / "data"
    write_synthetic_dataset(path, contract=CONTRACT, num_episodes=12, episode_len=24, shard_size=100, aux_targets=True)
    return path


def test_aux_targets_round_trip_and_are_required_exactly_when_the_meta_names_them(aux_data_dir, tmp_path):
    ds = FeatureDataset(aux_data_dir)
    assert ds.meta.aux_target_names == ("goal_0", "goal_1") and ds.aux_targets.shape == (len(ds), 2)
    batch = ds.batch([0, 30])
    assert torch.equal(batch["aux_targets"], ds.aux_targets[[0, 30]])
    n_layers, tokens, width = CONTRACT.shape
    sample = (np.ones((n_layers, tokens, width)), np.ones(tokens, bool), np.zeros(8), np.zeros((16, 8)), 0, 0)
    with FeatureDatasetWriter(tmp_path / "named", _meta(aux_target_names=("x", "y"))) as w:
        with pytest.raises(DatasetError, match=r"aux_targets missing.*\('x', 'y'\)"):
            w.add(*sample)
        with pytest.raises(DatasetError, match="aux_targets contains inf"):
            w.add(*sample, aux_targets=[0.1, np.inf])
        w.add(*sample, aux_targets=[0.1, 0.2])
        w.add(*sample, aux_targets=[0.3, np.nan])  # NaN: this sample has no such target
    np.testing.assert_allclose(FeatureDataset(tmp_path / "named").aux_targets.numpy(), [[0.1, 0.2], [0.3, np.nan]])
    with FeatureDatasetWriter(tmp_path / "plain", _meta()) as w:
        with pytest.raises(DatasetError, match="aux_targets given"):
            w.add(*sample, aux_targets=[0.1, 0.2])
        w.add(*sample)
    plain = FeatureDataset(tmp_path / "plain")
    assert plain.aux_targets is None and "aux_targets" not in plain.batch([0])


def test_an_aux_weighted_head_learns_to_predict_the_targets_and_acts_as_before(aux_data_dir, data_dir, tmp_path):
    run = _run("mol+mlp", steps=60, aux_weight=1.0, lr=5e-3)
    result = train(aux_data_dir, tmp_path / "ckpt", run, progress=False, plot=False)
    (step0, rmse0), (step_n, rmse_n) = result.val_aux_rmse[0], result.val_aux_rmse[-1]
    assert (step0, step_n) == (0, 60)
    ds = FeatureDataset(aux_data_dir)
    spread = float(ds.aux_targets.std(0).mean())
    assert rmse_n < 0.3 * spread < rmse0, result.val_aux_rmse  # from a guess to well inside the targets' spread
    head = load_head(tmp_path / "ckpt")
    assert head.config.aux_target_names == ("goal_0", "goal_1")
    batch = ds.batch(np.arange(len(ds)))
    predicted = head.predict_aux(batch["hidden"], batch["mask"], batch["state"])
    assert float((predicted - batch["aux_targets"]).pow(2).mean().sqrt()) < 0.3 * spread
    # The deployed interface is unchanged: same inputs, a chunk out, no targets needed.
    assert head(batch["hidden"][:2], batch["mask"][:2], batch["state"][:2]).shape == (2, 16, 8)
    with pytest.raises(RuntimeError, match="without auxiliary targets"):
        train(data_dir, tmp_path / "plain", _run("mol+mlp", steps=1), progress=False, plot=False)
        load_head(tmp_path / "plain").predict_aux(batch["hidden"][:1], batch["mask"][:1], batch["state"][:1])


def test_aux_weight_needs_a_dataset_with_targets_and_a_config_that_agrees(data_dir, tmp_path, capsys):
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "c"), "--config", "mol+mlp",
                       "--steps", "1", "--aux-weight", "0.5", "--no-progress"]) == 2
    assert "--object-targets" in capsys.readouterr().err
    config = small_head_config("mol+mlp")
    with pytest.raises(ValueError, match="auxiliary targets exactly when"):
        dataclasses.replace(config, aux_target_names=("x",))
    with pytest.raises(ValueError, match="aux_weight must be finite"):
        dataclasses.replace(config.arch, aux_weight=float("nan"))
    # First frames for a loss that is not there would be silently ignored: refused instead.
    with pytest.raises(ValueError, match="needs an auxiliary loss"):
        _run("mol+mlp", aux_first_frames=3)
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "d"), "--config", "mol+mlp",
                       "--steps", "1", "--aux-first-frames", "3", "--no-progress"]) == 2
    assert "--aux-weight" in capsys.readouterr().err


def test_frame_positions_count_within_each_episode_whatever_the_storage_order():
    from m2vla_core.training.feature_dataset import frame_positions

    assert frame_positions(np.array([3, 3, 3, 1, 1, 3, 7])).tolist() == [0, 1, 2, 0, 1, 3, 0]


def test_aux_first_frames_learns_the_targets_from_each_episodes_first_frames_only(aux_data_dir, tmp_path):
    from m2vla_core.training.trainer import aux_sample_indices

    ds = FeatureDataset(aux_data_dir)
    train_idx, _ = ds.split_by_episode(0.25, seed=0)
    picked = aux_sample_indices(ds, train_idx, first_frames=2)
    assert len(picked) == 2 * len(np.unique(ds.episode_index[train_idx]))
    assert set(ds.frame_index[picked]) == {0, 1}
    run = _run("mol+mlp", steps=60, aux_weight=1.0, lr=5e-3, aux_first_frames=2)
    result = train(aux_data_dir, tmp_path / "ckpt", run, progress=False, plot=False)
    assert result.val_aux_rmse[-1][1] < 0.5 * result.val_aux_rmse[0][1], result.val_aux_rmse
    with pytest.raises(ValueError, match="aux_first_frames"):
        TrainConfig(aux_first_frames=-1)


def test_first_frame_validation_samples_are_picked_before_the_split_is_thinned(aux_data_dir):
    from m2vla_core.training.trainer import validation_indices

    ds = FeatureDataset(aux_data_dir)
    _, val_split = ds.split_by_episode(0.25, seed=0)
    first = int((ds.frame_index[val_split] < 2).sum())  # 2 per validation episode
    val_idx, aux_idx = validation_indices(ds, val_split, TrainConfig(aux_first_frames=2, val_max_samples=first))
    assert len(val_idx) == first and len(aux_idx) == first
    assert (ds.frame_index[aux_idx] < 2).all()
    assert (ds.frame_index[val_idx] < 2).sum() < first  # thinning the split first would have lost them


def test_absent_aux_targets_are_left_out_of_the_loss_and_the_error(aux_data_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "absent"
    shutil.copytree(aux_data_dir, copy)
    for shard in sorted(copy.glob("shard-*.safetensors")):  # goal_1 never known, goal_0 for every other sample
        tensors = load_file(str(shard))
        tensors["aux_targets"][:, 1] = float("nan")
        tensors["aux_targets"][1::2, 0] = float("nan")
        save_file(tensors, str(shard))
    run = _run("mol+mlp", steps=40, aux_weight=1.0, lr=5e-3)
    result = train(copy, tmp_path / "ckpt", run, progress=False, plot=False)
    rmse = [r for _, r in result.val_aux_rmse]
    assert all(np.isfinite(rmse)) and rmse[-1] < rmse[0], rmse
    head = load_head(tmp_path / "ckpt")
    assert head.aux_predictor.target_mean[1] == 0.0 and head.aux_predictor.target_std[1] == 1.0  # never seen
    unknown = np.flatnonzero(torch.isnan(FeatureDataset(copy).aux_targets).all(1).numpy())
    assert len(unknown) and math.isnan(aux_rmse(head, FeatureDataset(copy), unknown))  # no error where nothing is known
    assert torch.isfinite(head.aux_predictor.target_mean).all()


def test_a_standardizing_head_is_trained_with_its_training_splits_feature_stats_and_keeps_them(data_dir, tmp_path):
    run = _run("mol+mlp", steps=2)
    run = dataclasses.replace(run, arch=dataclasses.replace(
        run.arch, mol=dataclasses.replace(run.arch.mol, feature_norm="standardize")))
    train(data_dir, tmp_path / "ckpt", run, progress=False, plot=False)
    ds = FeatureDataset(data_dir)
    train_idx, _ = ds.split_by_episode(run.train.val_fraction, seed=run.train.seed)
    hidden = ds.hidden[torch.as_tensor(train_idx)].double()  # (N, L, T, D)
    tokens = hidden.permute(1, 3, 0, 2)[:, :, ds.mask[torch.as_tensor(train_idx)]]  # (L, D, valid tokens)
    head = load_head(tmp_path / "ckpt")
    torch.testing.assert_close(head.mol.feature_mean, tokens.mean(-1).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.mol.feature_std, tokens.std(-1, unbiased=False).float(), atol=1e-4, rtol=1e-3)


# -- position noise: a head that will read a localiser's positions is trained on perturbed ones --
def test_position_noise_moves_each_named_point_by_the_given_spread_and_nothing_else():
    from m2vla_core.training.trainer import perturb_positions

    joints = torch.randn(4000, 8)
    reach = torch.tensor([0.5, 0.1, 0.5, 0.1]).expand(2000, 4)  # the target is the cube itself
    place = torch.tensor([0.5, 0.1, 0.4, -0.2]).expand(2000, 4)
    state = torch.cat([joints, torch.cat([reach, place])], dim=1)
    moved = perturb_positions(state, 0.01, step=7, cfg=TrainConfig())
    assert torch.equal(moved[:, :8], state[:, :8]) and not torch.equal(moved, state)
    offset = (moved - state)[:, 8:]
    assert float(offset.std()) == pytest.approx(0.01, rel=0.05)
    assert torch.equal(offset[:2000, :2], offset[:2000, 2:])  # reach: cube and target move together
    assert not torch.allclose(offset[2000:, :2], offset[2000:, 2:])  # place: each point its own draw
    assert torch.equal(moved, perturb_positions(state, 0.01, step=7, cfg=TrainConfig()))  # a resume repeats it
    assert not torch.equal(moved, perturb_positions(state, 0.01, step=8, cfg=TrainConfig()))


def test_position_noise_needs_positions_in_the_state_and_a_finite_spread(data_dir, tmp_path, capsys):
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "n"), "--steps", "1",
                       "--position-noise-cm", "1", "--no-progress"]) == 2
    assert "--privileged-state" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="position_noise_m"):
        TrainConfig(position_noise_m=float("nan"))


def test_an_l1_action_loss_trains_and_validation_still_reports_the_mse(data_dir, tmp_path):
    from m2vla_core.training.trainer import validation_loss

    result = train(data_dir, tmp_path / "ckpt", _run("mol+msm", steps=60, lr=5e-3, action_loss="l1"), progress=False,
                   plot=False)
    assert result.val_loss[-1][1] < 0.85 * result.val_loss[0][1]  # as the MSE-trained MSM must
    head = load_head(tmp_path / "ckpt")
    ds = FeatureDataset(data_dir)
    val_idx = ds.split_by_episode(0.25, seed=0)[1]
    assert validation_loss(head, ds, val_idx) == pytest.approx(result.val_loss[-1][1], rel=1e-4)
    with pytest.raises(ValueError, match="action_loss"):
        TrainConfig(action_loss="huber")
