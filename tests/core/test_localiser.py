"""The object localiser: learns where objects are and which ones an instruction names; saved and
loaded safely."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2vla_core.heads.checkpoint import CheckpointError
from m2vla_core.heads.localiser import (
    CONFIG_NAME, WEIGHTS_NAME, LocaliserConfig, ObjectLocaliser, load_localiser, save_localiser,
)
from m2vla_core.training.localiser import FirstFrames, LocaliserFitConfig, fit_localiser

KEYS = ("red_cube", "blue_cube", "red_zone")
SIDE, DIM = 4, 8


def _config(**overrides) -> LocaliserConfig:
    base = dict(backbone_id="tiny", backbone_digest="abc", object_keys=KEYS, image_size=112,
                num_image_tokens=SIDE * SIDE, num_text_tokens=2, width=DIM, hidden=32)
    return LocaliserConfig(**{**base, **overrides})


def _synthetic_frames(n: int, seed: int = 0) -> FirstFrames:
    """Each object sits on its own grid cell, whose token carries the object's one-hot; the two
    instruction tokens carry which object is the cube and which the target (index 3: itself)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.05, (n, SIDE * SIDE, DIM)).astype(np.float32)
    text = np.zeros((n, 2, DIM), np.float32)
    xy = np.zeros((n, len(KEYS), 2), np.float32)
    cube, target = rng.integers(0, 2, n), rng.integers(0, len(KEYS) + 1, n)
    for i in range(n):
        cells = rng.choice(SIDE * SIDE, len(KEYS), replace=False)
        for k, cell in enumerate(cells):
            if k == 1 and cube[i] == 0 and target[i] != 1 and i % 2:  # absent, as most objects of a layout are
                xy[i, k] = np.nan
                continue
            image[i, cell, k] += 1.0
            xy[i, k] = (0.4 + 0.1 * (cell // SIDE), -0.15 + 0.1 * (cell % SIDE))
        text[i, 0, cube[i]] = 1.0
        text[i, 1, 4 + min(target[i], 3)] = 1.0
    return FirstFrames(torch.as_tensor(image), torch.as_tensor(text), torch.as_tensor(xy),
                       torch.as_tensor(cube), torch.as_tensor(target))


def test_it_learns_where_each_object_is_and_which_two_the_instruction_names():
    frames = _synthetic_frames(400)
    fit = LocaliserFitConfig(steps=600, restarts=(0,), token_weight=0.0)  # synthetic cells are not the camera's
    model, report = fit_localiser(_config(peak_radius=-1), frames, fit, log=lambda s: None)  # read as trained
    held_out = report["selected"]["val"]
    assert held_out["cube_pick_accuracy"] == 1.0 and held_out["target_pick_accuracy"] == 1.0
    assert held_out["cube_median_m"] < 0.02 and held_out["target_median_m"] < 0.02  # cells are 10 cm apart
    named = model.named_xy(frames.image_tokens[:50], frames.text_tokens[:50])  # (50, 4)
    itself = frames.target_index[:50] == len(KEYS)
    torch.testing.assert_close(named[itself, 2:], named[itself, :2])  # no target: the cube's own position


def test_save_and_load_round_trip_gives_the_same_positions(tmp_path):
    model = ObjectLocaliser(_config()).eval()
    frames = _synthetic_frames(8)
    model.set_feature_stats(frames.image_tokens, frames.text_tokens)
    save_localiser(model, tmp_path)
    loaded = load_localiser(tmp_path, backbone=("tiny", "abc"))
    torch.testing.assert_close(loaded.named_xy(frames.image_tokens, frames.text_tokens),
                               model.named_xy(frames.image_tokens, frames.text_tokens))


def test_a_localiser_of_another_backbone_is_refused(tmp_path):
    save_localiser(ObjectLocaliser(_config()), tmp_path)
    with pytest.raises(CheckpointError, match="another|refusing"):
        load_localiser(tmp_path, backbone=("tiny", "other-digest"))


def test_pickles_and_mismatched_tensors_are_refused(tmp_path):
    save_localiser(ObjectLocaliser(_config()), tmp_path / "ok")
    (tmp_path / "ok" / "extra.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="pickle"):
        load_localiser(tmp_path / "ok")
    save_localiser(ObjectLocaliser(_config(hidden=16)), tmp_path / "small")
    (tmp_path / "small" / CONFIG_NAME).write_text((tmp_path / "ok" / CONFIG_NAME).read_text())
    with pytest.raises(CheckpointError, match="shape"):
        load_localiser(tmp_path / "small")
    with pytest.raises(CheckpointError, match="not found"):
        load_localiser(tmp_path / "missing")
    (tmp_path / "nojson").mkdir()
    (tmp_path / "nojson" / WEIGHTS_NAME).write_bytes((tmp_path / "ok" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="not a localiser"):
        load_localiser(tmp_path / "nojson")


def test_half_a_localiser_counts_as_one_so_that_loading_it_fails_loudly(tmp_path):
    from m2vla_core.heads.localiser import has_localiser

    save_localiser(ObjectLocaliser(_config()), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    assert has_localiser(tmp_path)
    with pytest.raises(CheckpointError, match="not a localiser"):
        load_localiser(tmp_path)


def test_non_finite_weights_are_refused(tmp_path):
    model = ObjectLocaliser(_config())
    with torch.no_grad():
        model.cube_logits.bias[0] = float("nan")
    save_localiser(model, tmp_path)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_localiser(tmp_path)


def test_config_refuses_a_token_count_that_is_not_a_square_grid():
    with pytest.raises(ValueError, match="square"):
        _config(num_image_tokens=12)
    with pytest.raises(ValueError, match="object_keys"):
        _config(object_keys=())
    with pytest.raises(ValueError, match="context"):
        _config(context=2)  # a kernel needs a centre token


def test_with_context_a_tokens_detection_sees_its_neighbours_but_not_far_tokens(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randn(1, SIDE * SIDE, DIM)
    changed = tokens.clone()
    changed[0, 0] += 3.0  # the token at row 0, column 0
    neighbour, far = 1, SIDE * SIDE - 1  # row 0 column 1; the opposite corner
    for context, sees_neighbour in ((0, False), (3, True)):
        localiser = ObjectLocaliser(_config(context=context)).eval()
        with torch.no_grad():
            before = localiser.where(tokens, with_scores=True)[1][0]  # (T, K)
            after = localiser.where(changed, with_scores=True)[1][0]
        assert torch.equal(before[far], after[far])
        assert (not torch.equal(before[neighbour], after[neighbour])) == sees_neighbour, context
    save_localiser(localiser, tmp_path)  # the convolution's weights are saved and loaded with the rest
    loaded = load_localiser(tmp_path)
    assert loaded.config.context == 3
    text = torch.randn(1, 2, DIM)
    torch.testing.assert_close(loaded.named_xy(tokens, text), localiser.named_xy(tokens, text))


def test_first_frames_round_trip_through_their_safetensors_cache(tmp_path):
    frames = _synthetic_frames(5)
    frames.save(tmp_path / "frames.safetensors", {"image_size": "112"})
    loaded, meta = FirstFrames.load(tmp_path / "frames.safetensors")
    assert meta["image_size"] == "112"
    for name in ("image_tokens", "text_tokens", "objects_xy", "cube_index", "target_index"):
        torch.testing.assert_close(getattr(loaded, name), getattr(frames, name), equal_nan=True)


def test_each_cube_falls_on_the_image_token_the_camera_projection_names():
    from m2vla_core.sim import SimConfig, TaskEnv
    from m2vla_core.sim.scene import COLOURS_RGBA
    from m2vla_core.sim.tasks import object_keys
    from m2vla_core.training.localiser import object_tokens

    side, size = 8, 224
    cell = size // side
    with TaskEnv(SimConfig(image_width=size, image_height=size)) as env:
        for seed in range(3):
            obs = env.reset("stack", seed)
            xy = torch.as_tensor(env.spec.objects_xy(), dtype=torch.float32).view(1, -1, 2)
            tokens = object_tokens(xy, side)[0]  # (K,)
            keys = object_keys()
            assert (tokens[torch.isnan(xy[0, :, 0])] == -1).all()  # absent objects have no token
            for cube in env.spec.layout.cubes:
                token = int(tokens[keys.index(f"{cube.colour}_cube")])
                row, col = divmod(token, side)
                patch = obs.image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3).astype(float)
                colour = np.asarray(COLOURS_RGBA[cube.colour][:3]) * 255
                assert (np.abs(patch - colour).max(axis=1) < 40).any(), (seed, cube.colour)  # its colour is there


def test_reading_near_the_peak_does_not_average_two_detections_into_their_midpoint():
    from m2vla_core.heads.localiser import SpatialProbe

    probe = SpatialProbe(dim=1, num_tokens=16, num_classes=1, hidden=4)
    probe.detect = torch.nn.Linear(1, 1, bias=False)  # score = 20 x the token's feature
    probe.offset = torch.nn.Linear(1, 2)
    probe.to_table = torch.nn.Linear(2, 2)
    with torch.no_grad():
        probe.detect.weight.fill_(20.0)
        probe.offset.weight.zero_(), probe.offset.bias.zero_()
        probe.to_table.weight.copy_(torch.eye(2)), probe.to_table.bias.zero_()
    tokens = torch.zeros(1, 16, 1)
    tokens[0, 0, 0], tokens[0, 15, 0] = 1.0, 0.99  # two detections: grid corners (-1, -1) and (1, 1)
    with torch.no_grad():
        everywhere = probe(tokens)[0, 0]
        near_peak = probe(tokens, peak_radius=1)[0, 0]
    assert everywhere.abs().max() < 0.2  # the midpoint of the two corners
    torch.testing.assert_close(near_peak, torch.tensor([-1.0, -1.0]), atol=1e-3, rtol=0)


def test_the_shipped_reader_refuses_an_instruction_naming_no_object_it_knows_before_reading_the_frame():
    from m2vla_core.assets_paths import default_policy_path
    from m2vla_core.backbone import FrozenBackbone, default_backbone_path
    from m2vla_core.heads.localiser import NamedObjectReader
    from m2vla_core.instructions import InstructionError

    backbone = FrozenBackbone.from_pretrained(default_backbone_path())
    reader = NamedObjectReader(load_localiser(default_policy_path(), backbone=(backbone.backbone_id,
                                                                                backbone.weights_digest)), backbone)
    assert reader.colours == {"red", "green", "blue", "yellow"}
    frame = np.zeros((reader.image_size, reader.image_size, 3), np.uint8)
    for instruction in ("stop", "pick up the purple cube"):
        with pytest.raises(InstructionError):
            reader.read(frame, instruction)
    assert reader.read(frame, "pick up the red cube").shape == (4,)  # a known one is read (here: from a black frame)
