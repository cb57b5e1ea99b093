"""``m2vla probe``: the pixel source it compares backbones against."""

from __future__ import annotations

import numpy as np
import torch

from m2vla_core.evaluation.probe import pixel_tokens


def test_pixel_tokens_are_block_mean_colours_on_the_token_grid():
    frames = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    frames[0, 28:35, 56:63] = (255, 0, 0)  # one 7x7 block, token row 1, column 2, its top-left block
    tokens = pixel_tokens(frames, grid=8)
    assert tokens.shape == (1, 64, 4 * 4 * 3)
    assert torch.nonzero(tokens[0].sum(-1)).flatten().tolist() == [8 + 2]
    assert torch.allclose(tokens[0, 10, :3], torch.tensor([1.0, 0.0, 0.0]))


def test_probe_image_size_renders_and_reads_a_finer_token_grid(tmp_path, capsys):
    import json

    from m2vla_core.evaluation.probe import main

    report_path = tmp_path / "probe.json"
    assert main(["--episodes-per-task", "3", "--image-size", "112", "--layers", "0", "--steps", "2", "--seeds", "0",
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert (report["image_size"], report["image_tokens"]) == (112, 16)  # (112 / 28)^2 merged Qwen2-VL patches
    assert [s["source"] for s in report["sources"]] == ["pixels", "layer 0"]
    assert report["layouts"]["train"] + report["layouts"]["val"] == 18  # 3 layouts x 6 tasks
