"""record -> features -> train -> export -> eval -> ablate, end to end on a few episodes (CPU, CI budget).

Success rates of such a tiny run mean nothing; what is checked is that every stage consumes
what the previous one wrote, that evaluation seeds stay disjoint from training seeds, and
that every report carries the keys users and scripts read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m2vla_core.backbone.cli import FeaturesConfig, build_feature_dataset, features_main, future_chunks
from m2vla_core.evaluation.ablate import cli_main as ablate_main
from m2vla_core.evaluation.cli import DEFAULT_SEED_OFFSET, EvalConfig, eval_main
from m2vla_core.sim.record import cli_main as record_main
from m2vla_core.training.cli import train_main
from m2vla_core.training.feature_dataset import FeatureDataset

TASKS = "reach_above,push_to_zone"
SMALL = ["--image-tokens", "16", "--text-tokens", "8", "--layers", "2,4,6", "--chunk-len", "8"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data, feats, ckpt = root / "data", root / "features", root / "ckpt"
    assert record_main(["--out", str(data), "--tasks", TASKS, "--episodes-per-task", "2", "--image-size", "64",
                        "--no-progress"]) == 0
    cache = root / "cache"
    assert features_main(["--data", str(data), "--out", str(feats), "--cache", str(cache), "--no-progress",
                          *SMALL]) == 0
    assert train_main(["--data", str(feats), "--out", str(ckpt), "--steps", "40", "--batch-size", "16",
                       "--no-progress"]) == 0
    from m2vla_core.export.cli import export_main

    assert export_main([str(ckpt)]) == 0
    return {"root": root, "data": data, "features": feats, "ckpt": ckpt, "cache": cache}


def test_future_chunks_repeat_the_final_action_past_the_episode_end():
    actions = np.arange(12, dtype=np.float32).reshape(4, 3)  # (T=4, A=3)
    chunks = future_chunks(actions, 3)  # (4, 3, 3)
    assert chunks.shape == (4, 3, 3)
    np.testing.assert_array_equal(chunks[0], actions[0:3])
    np.testing.assert_array_equal(chunks[3], np.stack([actions[3]] * 3))


def test_features_config_rejects_unsorted_layers_and_short_chunks():
    with pytest.raises(ValueError, match="layers"):
        FeaturesConfig(layers=(4, 2))
    with pytest.raises(ValueError, match="chunk_len"):
        FeaturesConfig(chunk_len=1)


def test_feature_dataset_has_one_sample_per_recorded_frame(pipeline):
    from m2vla_core.sim.lerobot_io import load_lerobot_episodes

    frames = sum(len(ep) for ep in load_lerobot_episodes(pipeline["data"]))
    dataset = FeatureDataset(pipeline["features"])
    assert len(dataset) == frames
    assert dataset.meta.contract.layers == (2, 4, 6)
    assert dataset.meta.chunk_len == 8


def test_second_features_run_is_served_from_the_disk_cache(pipeline, tmp_path):
    summary = build_feature_dataset(pipeline["data"], tmp_path / "again",
                                    FeaturesConfig(layers=(2, 4, 6), num_image_tokens=16, num_text_tokens=8,
                                                   chunk_len=8), cache_dir=pipeline["cache"], progress=False)
    assert summary["computed"] == 0 and summary["cached"] == summary["samples"] > 0


def test_appending_a_second_recording_keeps_its_episodes_apart_from_the_first(pipeline, tmp_path):
    from m2vla_core.training.feature_dataset import FeatureDataset

    config = FeaturesConfig(layers=(2, 4, 6), num_image_tokens=16, num_text_tokens=8, chunk_len=8)
    out = tmp_path / "both"
    first = build_feature_dataset(pipeline["data"], out, config, cache_dir=pipeline["cache"], progress=False)
    second = build_feature_dataset(pipeline["data"], out, config, cache_dir=pipeline["cache"], progress=False,
                                   append=True)  # another recording: its episode indices restart at 0 too
    assert (first["episode_offset"], second["episode_offset"]) == (0, first["episodes"])
    data = FeatureDataset(out)
    assert len(np.unique(data.episode_index)) == first["episodes"] + second["episodes"]
    assert data.meta.num_episodes == first["episodes"] + second["episodes"]
    half = len(data) // 2
    np.testing.assert_array_equal(data.episode_index[half:], data.episode_index[:half] + first["episodes"])


def test_eval_writes_json_table_chart_and_gif_on_held_out_seeds(pipeline, capsys):
    out = pipeline["root"] / "eval"
    json_path = pipeline["root"] / "eval.json"
    assert eval_main(["--policy", str(pipeline["ckpt"]), "--episodes", "1", "--tasks", "reach_above",
                      "--max-steps", "8", "--json", str(json_path), "--out", str(out), "--no-progress"]) == 0
    report = json.loads(json_path.read_text())
    assert 0.0 <= report["mean_success"] <= 1.0
    assert set(report["success"]) == {"reach_above"}
    assert report["seeds"]["reach_above"] == [DEFAULT_SEED_OFFSET]  # disjoint from record's seeds 0..
    assert report["act_ms_p50"] > 0 and report["head_us_p50"] > 0
    assert report["object_error_m_p50"] == {}  # a head without position targets believes nothing to score
    assert (out / "success.png").stat().st_size > 0 and (out / "reach_above.gif").stat().st_size > 0
    assert "reach_above" in capsys.readouterr().out


def test_eval_seed_offset_moves_the_whole_seed_range(pipeline, tmp_path):
    json_path = tmp_path / "eval.json"
    assert eval_main(["--policy", str(pipeline["ckpt"]), "--episodes", "2", "--tasks", "push_to_zone",
                      "--seed-offset", "5000", "--max-steps", "4", "--json", str(json_path), "--no-progress"]) == 0
    assert json.loads(json_path.read_text())["seeds"]["push_to_zone"] == [5000, 5001]


def test_eval_refuses_a_missing_policy_with_a_clear_error(tmp_path, capsys):
    assert eval_main(["--policy", str(tmp_path / "nope"), "--episodes", "1", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_config_rejects_more_workers_than_cores():
    with pytest.raises(ValueError, match="workers"):
        EvalConfig(workers=64)


def test_ablate_writes_a_row_per_variant(pipeline):
    out = pipeline["root"] / "ablation"
    assert ablate_main(["--features", str(pipeline["features"]), "--out", str(out), "--variants", "last+mlp,mol+msm",
                        "--steps", "10", "--episodes", "1", "--tasks", "reach_above", "--max-steps", "4",
                        "--bench-iters", "20", "--no-progress"]) == 0
    table = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["last+mlp", "mol+msm"]
    for row in table["rows"]:
        assert row["trainable_params"] > 0 and row["head_us_p50_onnxruntime"] > 0
        assert set(row["success"]) == {"reach_above"}
    markdown = (out / "ablation.md").read_text()
    assert "| last+mlp |" in markdown and "| mol+msm |" in markdown


# -- privileged state: what the head could do if perception located the named objects exactly --
def _privileged_features(pipeline, out):
    config = FeaturesConfig(layers=(2, 4, 6), num_image_tokens=16, num_text_tokens=8, chunk_len=8,
                            privileged_state=True)
    build_feature_dataset(pipeline["data"], out, config, cache_dir=pipeline["cache"], progress=False)
    return FeatureDataset(out)


def test_privileged_state_appends_each_episodes_named_objects_recomputed_from_its_seed(pipeline, tmp_path):
    from m2vla_core.sim.lerobot_io import load_lerobot_episodes
    from m2vla_core.sim.tasks import PRIVILEGED_STATE_NAMES, get_task

    plain, privileged = FeatureDataset(pipeline["features"]), _privileged_features(pipeline, tmp_path / "priv")
    assert privileged.meta.state_dim == plain.meta.state_dim + 4
    assert privileged.meta.state_names == (*plain.meta.state_names, *PRIVILEGED_STATE_NAMES)
    state = privileged.batch(np.arange(len(privileged)))["state"].numpy()  # (N, S + 4)
    np.testing.assert_array_equal(state[:, :-4], plain.batch(np.arange(len(plain)))["state"].numpy())
    for episode in load_lerobot_episodes(pipeline["data"]):
        truth = get_task(episode.task).make_episode(episode.seed).named_objects_xy()
        rows = state[privileged.episode_index == episode.index, -4:]  # (T, 4)
        assert len(rows) == len(episode)
        np.testing.assert_allclose(rows, np.tile(truth, (len(rows), 1)), atol=1e-6)


def _object_target_features(pipeline, out):
    config = FeaturesConfig(layers=(2, 4, 6), num_image_tokens=16, num_text_tokens=8, chunk_len=8, object_targets=True)
    build_feature_dataset(pipeline["data"], out, config, cache_dir=pipeline["cache"], progress=False)
    return FeatureDataset(out)


def test_object_targets_store_the_same_positions_beside_an_unchanged_state(pipeline, tmp_path):
    from m2vla_core.sim.lerobot_io import load_lerobot_episodes
    from m2vla_core.sim.tasks import OBJECT_XY_NAMES, get_task

    plain, targeted = FeatureDataset(pipeline["features"]), _object_target_features(pipeline, tmp_path / "targets")
    assert targeted.meta.aux_target_names == OBJECT_XY_NAMES  # every object, by colour and kind
    assert targeted.meta.state_names == plain.meta.state_names  # the head reads what it always read
    assert torch.equal(targeted.state, plain.state)
    for episode in load_lerobot_episodes(pipeline["data"]):
        spec = get_task(episode.task).make_episode(episode.seed)
        rows = targeted.aux_targets[targeted.episode_index == episode.index].numpy()  # (T, 24)
        assert len(rows) == len(episode)
        np.testing.assert_allclose(rows, np.tile(spec.objects_xy(), (len(rows), 1)), atol=1e-6)  # NaN where absent
        present = ~np.isnan(rows[0].reshape(-1, 2)[:, 0])
        assert present.sum() == len(spec.layout.cubes) + len(spec.layout.targets)


def test_eval_scores_where_a_position_trained_head_believes_the_objects_are(pipeline, tmp_path):
    from m2vla_core.export.cli import export_main

    _object_target_features(pipeline, tmp_path / "targets")
    ckpt, json_path = tmp_path / "ckpt", tmp_path / "eval.json"
    assert train_main(["--data", str(tmp_path / "targets"), "--out", str(ckpt), "--config", "mol+mlp", "--steps", "20",
                       "--batch-size", "16", "--aux-weight", "1", "--no-progress"]) == 0
    assert export_main([str(ckpt)]) == 0
    assert eval_main(["--policy", str(ckpt), "--episodes", "2", "--tasks", "reach_above", "--max-steps", "4",
                      "--json", str(json_path), "--no-progress"]) == 0
    report = json.loads(json_path.read_text())
    errors = report["object_error_m_p50"]
    assert set(errors) == {"cube_first_act", "cube_all_acts", "target_all_acts"}
    assert all(0.0 < e < 1.0 for e in errors.values()), errors  # metres on a table, never exactly right
    first_acts = [ep["object_error_m_first_act"][0] for ep in report["episodes"]["reach_above"]]
    assert errors["cube_first_act"] == pytest.approx(float(np.median(first_acts)))


def test_a_belief_diagnostic_is_skipped_with_a_warning_where_the_predictor_is_absent(pipeline, tmp_path, caplog):
    import dataclasses
    import logging
    import shutil

    from m2vla_core.evaluation.agent import named_object_belief, object_position_head
    from m2vla_core.heads import load_head
    from m2vla_core.sim.tasks import NAMED_OBJECT_XY_NAMES, OBJECT_XY_NAMES, object_keys

    _object_target_features(pipeline, tmp_path / "targets")
    ckpt = tmp_path / "ckpt"
    assert train_main(["--data", str(tmp_path / "targets"), "--out", str(ckpt), "--config", "mol+mlp", "--steps", "1",
                       "--aux-weight", "1", "--no-progress"]) == 0
    config = load_head(ckpt).config
    assert object_position_head(ckpt, config) is not None
    onnx_only = tmp_path / "onnx_only"  # a head shipped as its ONNX graph alone
    shutil.copytree(ckpt, onnx_only)
    (onnx_only / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        assert object_position_head(onnx_only, config) is None
    assert "no model.safetensors" in caplog.text
    named = dataclasses.replace(config, aux_target_names=NAMED_OBJECT_XY_NAMES)
    assert object_position_head(ckpt, named) is not None  # taught the named cube and target alone
    other = dataclasses.replace(config, aux_target_names=("goal_0",))
    with caplog.at_level(logging.WARNING):
        assert object_position_head(ckpt, other) is None
    assert "not object positions" in caplog.text
    # A named-only prediction is the named objects' x, y as is; an every-object one is looked up by key.
    keys = object_keys()[3], object_keys()[5]
    every = np.arange(len(OBJECT_XY_NAMES), dtype=np.float32)
    np.testing.assert_array_equal(named_object_belief(every, keys), [6, 7, 10, 11])
    np.testing.assert_array_equal(named_object_belief(every[:4], keys), every[:4])


def test_privileged_state_refuses_a_recording_whose_seed_now_gives_another_layout(pipeline, tmp_path):
    import shutil

    from m2vla_core.sim.tasks import get_task

    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data)
    lines = [json.loads(line) for line in (data / "meta" / "episodes.jsonl").read_text().splitlines()]
    recorded = get_task(lines[0]["m2vla_task"]).make_episode(lines[0]["seed"]).instruction
    lines[0]["seed"] = next(s for s in range(100, 200)
                            if get_task(lines[0]["m2vla_task"]).make_episode(s).instruction != recorded)
    (data / "meta" / "episodes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match="re-record"):
        build_feature_dataset(data, tmp_path / "out", FeaturesConfig(privileged_state=True, max_episodes=1),
                              cache_dir=tmp_path / "cache", progress=False)


def test_named_object_error_moves_each_point_by_exactly_that_distance_the_same_way_every_run():
    from m2vla_core.evaluation.agent import perturb_named_objects

    xy = np.array([0.5, 0.1, 0.4, -0.2])
    moved = perturb_named_objects(xy, 0.03)
    np.testing.assert_allclose(np.hypot(*(moved - xy).reshape(2, 2).T), [0.03, 0.03], atol=1e-6)
    np.testing.assert_array_equal(moved, perturb_named_objects(xy, 0.03))
    assert not np.allclose(perturb_named_objects(xy + 0.1, 0.03) - (xy + 0.1), moved - xy, atol=1e-4)
    same = perturb_named_objects(np.array([0.5, 0.1, 0.5, 0.1]), 0.02)  # reach: the target is the cube
    np.testing.assert_array_equal(same[:2], same[2:])
    np.testing.assert_array_equal(perturb_named_objects(xy, 0.0), xy.astype(np.float32))


def test_privileged_names_anywhere_but_last_are_refused():
    from m2vla_core.sim.tasks import PRIVILEGED_STATE_NAMES, reads_privileged_state

    assert not reads_privileged_state(("panda_joint1", "gripper_opening"))
    assert reads_privileged_state(("panda_joint1", *PRIVILEGED_STATE_NAMES))
    with pytest.raises(ValueError, match="last"):
        reads_privileged_state((*PRIVILEGED_STATE_NAMES, "panda_joint1"))


def test_a_privileged_head_runs_in_eval_with_the_sim_truth_and_is_refused_for_a_robot(pipeline, tmp_path):
    from m2vla_core.evaluation.agent import VLAAgent, perturb_named_objects
    from m2vla_core.export.cli import export_main
    from m2vla_core.policy_engine import PolicyEngine, PolicyLoadError
    from m2vla_core.sim import SimConfig, TaskEnv

    _privileged_features(pipeline, tmp_path / "priv")
    ckpt = tmp_path / "ckpt"
    assert train_main(["--data", str(tmp_path / "priv"), "--out", str(ckpt), "--steps", "20", "--batch-size", "16",
                       "--position-noise-cm", "1", "--no-progress"]) == 0
    assert json.loads((ckpt / "train.json").read_text())["run"]["train"]["position_noise_m"] == pytest.approx(0.01)
    assert export_main([str(ckpt)]) == 0
    json_path = tmp_path / "eval.json"
    assert eval_main(["--policy", str(ckpt), "--episodes", "1", "--tasks", "reach_above", "--max-steps", "4",
                      "--privileged-error-cm", "3", "--json", str(json_path), "--no-progress"]) == 0
    assert json.loads(json_path.read_text())["config"]["privileged_error_m"] == pytest.approx(0.03)

    agent = VLAAgent.load(ckpt, privileged_error_m=0.03)
    with TaskEnv(SimConfig(image_width=64, image_height=64)) as env:
        obs = env.reset("reach_above", 1000)
    state = agent.state(obs)
    np.testing.assert_array_equal(state[:8], obs.joint_positions.astype(np.float32))
    np.testing.assert_array_equal(state[8:], perturb_named_objects(obs.named_objects_xy, 0.03))

    with pytest.raises(PolicyLoadError, match="no object localiser"):  # no robot has the sim's truth
        PolicyEngine().load(str(ckpt))


@pytest.fixture(scope="module")
def privileged_policy(pipeline):
    """A head of the shipped recipe's options trained on a privileged-state dataset, with a localiser."""
    from m2vla_core.export.cli import export_main
    from m2vla_core.training.localiser import main as localiser_main

    features, ckpt = pipeline["root"] / "priv", pipeline["root"] / "priv_ckpt"
    _privileged_features(pipeline, features)
    assert train_main(["--data", str(features), "--out", str(ckpt), "--steps", "20", "--batch-size", "16",
                       "--gripper-features", "panda", "--relative-actions", "on", "--action-loss", "l1",
                       "--no-progress"]) == 0  # the shipped recipe's head options
    assert export_main([str(ckpt)]) == 0
    assert localiser_main(["--out", str(ckpt), "--tasks", "reach_above", "--episodes-per-task", "4",
                           "--image-size", "56", "--steps", "5", "--restarts", "0", "--no-progress"]) == 0
    assert json.loads((ckpt / "localiser_fit.json").read_text())["layouts"]["val"] == 1
    return {"features": features, "ckpt": ckpt}


def test_a_localiser_beside_a_privileged_head_gives_it_positions_read_from_the_camera(privileged_policy, tmp_path,
                                                                                       monkeypatch):
    import dataclasses

    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.sim import TaskEnv

    ckpt = privileged_policy["ckpt"]
    agent = VLAAgent.load(ckpt)
    assert agent.localiser is not None
    assert agent.sim_config().image_width == 224  # the larger of the head's (default 224) and the localiser's 56
    readings = []
    perceive = agent.perceive
    monkeypatch.setattr(agent, "perceive", lambda *a: readings.append(perceive(*a)) or readings[-1])
    with TaskEnv(agent.sim_config()) as env:
        obs = env.reset("reach_above", 1000)
        agent.reset()
        blind = dataclasses.replace(obs, named_objects_xy=None, named_object_keys=None)  # as on a robot
        agent.act(blind)
        assert not np.allclose(agent.state(blind)[-4:], obs.named_objects_xy)  # not the truth: an untrained guess
        np.testing.assert_array_equal(agent.state(blind)[-4:], readings[0])
        agent.act(env.step(obs.joint_positions.astype(np.float32)))
        assert len(readings) == 1  # read once per episode ...
        agent.reset()
        agent.act(env.reset("reach_above", 1001))
        assert len(readings) == 2  # ... and again after a reset
    assert len(agent.object_errors_m) == 2  # the blind act has no truth to score against
    assert len(agent.localiser_ms) == 2

    json_path = tmp_path / "eval.json"
    assert eval_main(["--policy", str(ckpt), "--episodes", "1", "--tasks", "reach_above", "--max-steps", "4",
                      "--json", str(json_path), "--no-progress"]) == 0
    report = json.loads(json_path.read_text())
    assert report["object_positions"] == "localiser" and "cube_first_act" in report["object_error_m_p50"]


def test_ablate_trains_variants_of_a_checkpoints_recipe_and_evaluates_them_beside_its_localiser(privileged_policy,
                                                                                                 tmp_path):
    from m2vla_core.training.trainer import saved_run_config

    ckpt, out = privileged_policy["ckpt"], tmp_path / "ablation"
    assert ablate_main(["--features", str(privileged_policy["features"]), "--out", str(out), "--variants", "last+mlp",
                        "--base-config", str(ckpt), "--localiser", str(ckpt), "--steps", "10", "--episodes", "1",
                        "--tasks", "reach_above", "--max-steps", "4", "--bench-iters", "20", "--no-progress"]) == 0
    recipe, variant = saved_run_config(ckpt), saved_run_config(out / "last_mlp")
    assert (variant.arch.mol.mix, variant.arch.action_head) == ("last", "mlp")
    assert (variant.arch.relative_actions, variant.arch.gripper_features) == (True, "panda")  # the rest is the recipe's
    assert variant.train.action_loss == recipe.train.action_loss == "l1" and variant.train.steps == 10
    assert (out / "last_mlp" / "localiser.safetensors").is_file()
    assert json.loads((out / "ablation.json").read_text())["localiser"] == str(ckpt)


def test_ablate_refuses_a_localiser_of_another_backbone_before_training(privileged_policy, tmp_path, capsys):
    import shutil

    localiser = tmp_path / "other"
    shutil.copytree(privileged_policy["ckpt"], localiser)
    config = json.loads((localiser / "localiser.json").read_text())
    (localiser / "localiser.json").write_text(json.dumps({**config, "backbone_digest": "0" * 64}))
    assert ablate_main(["--features", str(privileged_policy["features"]), "--out", str(tmp_path / "ablation"),
                        "--localiser", str(localiser), "--no-progress"]) == 2
    assert "fitted on backbone" in capsys.readouterr().err
    assert not (tmp_path / "ablation").exists()


def test_a_localiser_beside_a_head_that_reads_no_positions_is_refused(pipeline, tmp_path):
    import shutil

    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.heads.checkpoint import load_head_config
    from m2vla_core.heads.localiser import LocaliserConfig, ObjectLocaliser, save_localiser
    from m2vla_core.sim.tasks import object_keys

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipeline["ckpt"], ckpt)
    head = load_head_config(ckpt)
    save_localiser(ObjectLocaliser(LocaliserConfig(backbone_id=head.backbone_id, backbone_digest=head.backbone_digest,
                                                   object_keys=object_keys(), image_size=56, num_image_tokens=4)),
                   ckpt)
    with pytest.raises(ValueError, match="privileged-state"):
        VLAAgent.load(ckpt)


def test_the_localiser_refuses_evaluation_seeds_and_a_frames_cache_of_other_settings(tmp_path, capsys):
    from m2vla_core.training.localiser import main as localiser_main

    with pytest.raises(SystemExit):
        localiser_main(["--out", str(tmp_path / "a"), "--episodes-per-task", "10", "--seed-offset", "995"])
    assert "below 1000" in capsys.readouterr().err
    frames = tmp_path / "frames.safetensors"
    common = ["--tasks", "reach_above", "--image-size", "56", "--steps", "2", "--restarts", "0", "--no-progress",
              "--frames", str(frames)]
    assert localiser_main(["--out", str(tmp_path / "a"), "--episodes-per-task", "3", *common]) == 0
    assert localiser_main(["--out", str(tmp_path / "b"), "--episodes-per-task", "3", *common]) == 0  # served
    with pytest.raises(SystemExit):
        localiser_main(["--out", str(tmp_path / "c"), "--episodes-per-task", "4", *common])
    assert "other settings" in capsys.readouterr().err


def test_eval_refuses_a_privileged_error_for_a_head_that_reads_no_privileged_state(pipeline, capsys):
    assert eval_main(["--policy", str(pipeline["ckpt"]), "--episodes", "1", "--tasks", "reach_above",
                      "--max-steps", "4", "--privileged-error-cm", "2", "--no-progress"]) == 2
    assert "--privileged-state" in capsys.readouterr().err


def test_a_head_trained_at_another_input_size_carries_it_to_eval(pipeline, tmp_path):
    from m2vla_core.evaluation.agent import VLAAgent
    from m2vla_core.export.cli import export_main

    config = FeaturesConfig(layers=(2, 4, 6), num_image_tokens=4, num_text_tokens=8, chunk_len=8, image_size=56)
    build_feature_dataset(pipeline["data"], tmp_path / "f56", config, cache_dir=pipeline["cache"], progress=False)
    assert FeatureDataset(tmp_path / "f56").meta.contract.image_size == 56
    ckpt = tmp_path / "ckpt"
    assert train_main(["--data", str(tmp_path / "f56"), "--out", str(ckpt), "--steps", "10", "--batch-size", "16",
                       "--no-progress"]) == 0
    assert export_main([str(ckpt)]) == 0
    agent = VLAAgent.load(ckpt)
    assert agent.backbone.image_size == 56  # loaded at the contract's size, not the backbone's default 224
    sim = agent.sim_config()
    assert (sim.image_width, sim.image_height) == (56, 56)  # and the camera renders what training saw
    assert eval_main(["--policy", str(ckpt), "--episodes", "1", "--tasks", "reach_above", "--max-steps", "4",
                      "--no-progress"]) == 0


def test_features_of_an_interrupted_recording_are_computed_with_a_warning(pipeline, tmp_path, capsys):
    import shutil

    data = tmp_path / "partial"
    shutil.copytree(pipeline["data"], data)
    info_path = data / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["m2vla"]["interrupted"] = True  # what m2vla record leaves after a Ctrl-C
    info_path.write_text(json.dumps(info))
    assert features_main(["--data", str(data), "--out", str(tmp_path / "f"), "--cache", str(pipeline["cache"]),
                          "--no-progress", *SMALL]) == 0
    assert "interrupted recording; using its 4 finished episodes" in capsys.readouterr().err


def test_features_refuse_an_input_size_larger_than_the_recorded_frames(pipeline, tmp_path, capsys):
    assert features_main(["--data", str(pipeline["data"]), "--out", str(tmp_path / "f"), "--cache",
                          str(pipeline["cache"]), "--image-size", "112", "--no-progress", *SMALL]) == 2
    assert "m2vla record --image-size 112" in capsys.readouterr().err


def test_record_with_a_policy_writes_takeover_episodes_that_features_accept(pipeline, tmp_path, capsys):
    from m2vla_core.sim.lerobot_io import load_lerobot_episodes

    data = tmp_path / "takeover"
    assert record_main(["--out", str(data), "--tasks", "reach_above", "--episodes-per-task", "1", "--policy",
                        str(pipeline["ckpt"]), "--takeover-steps", "3:3", "--no-progress"]) == 0
    info = json.loads((data / "meta" / "info.json").read_text())["m2vla"]
    assert info["takeover"]["policy"] == str(pipeline["ckpt"]) and info["takeover"]["min_steps"] == 3
    (episode,) = load_lerobot_episodes(data)
    assert episode.success and episode.timestamps[0] == 0.0
    assert "expert success 1/1  (the policy finished 0 more itself)" in capsys.readouterr().out
    assert features_main(["--data", str(data), "--out", str(tmp_path / "f"), "--cache", str(pipeline["cache"]),
                          "--no-progress", *SMALL]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--takeover-steps", "5"], "expected MIN:MAX"),
    (["--takeover-steps", "9:3"], "min_steps <= max_steps"),
    (["--image-size", "96"], "leave --image-size out with --policy"),
])
def test_record_with_a_policy_refuses_a_bad_range_or_another_image_size(pipeline, tmp_path, capsys, flags, message):
    assert record_main(["--out", str(tmp_path / "t"), "--tasks", "reach_above", "--episodes-per-task", "1",
                        "--policy", str(pipeline["ckpt"]), *flags, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_record_refuses_a_takeover_range_without_a_policy(tmp_path, capsys):
    assert record_main(["--out", str(tmp_path / "t"), "--tasks", "reach_above", "--takeover-steps", "5:9",
                        "--no-progress"]) == 2
    assert "--takeover-steps needs --policy" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
