"""Bad command-line input ends in one line on stderr and exit code 2, before any work is done
or lost: no Python traceback, no evaluation whose report cannot be written, no network for a
local path, no checkpoint written by a run that was refused."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from m2vla_core.cli import main as m2vla
from m2vla_core.heads.checkpoint import CheckpointError, check_safetensors_file


def _one_error_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for text in expected:
        assert text in last, err
    return last


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a directory\n")
    return path


# 1 ------------------------------------------------------------------------- eval --json / --out
def test_eval_refuses_a_json_path_that_is_a_directory_or_under_a_file_before_evaluating(tmp_path, a_file, capsys):
    # --policy does not exist: were the check after evaluate(), the error would name the policy instead
    base = ["eval", "--policy", str(tmp_path / "no_policy"), "--episodes", "1", "--max-steps", "2",
            "--tasks", "reach_above", "--no-progress"]
    assert m2vla(base + ["--json", str(tmp_path)]) == 2
    _one_error_line(capsys, "--json", str(tmp_path), "is a directory")
    assert m2vla(base + ["--json", str(a_file / "report.json")]) == 2
    _one_error_line(capsys, "--json", str(a_file), "is a file")
    assert m2vla(base + ["--out", str(a_file)]) == 2
    _one_error_line(capsys, "--out", str(a_file))


# 2 ------------------------------------------------------------------------- file vs directory
def test_dispatcher_ends_an_oserror_of_any_subcommand_with_exit_2_and_lets_keyboard_interrupt_through(
        tmp_path, monkeypatch, capsys):
    from m2vla_core import cli

    (tmp_path / "fake_cmds.py").write_text(
        "def disk_full(argv):\n    raise OSError(28, 'No space left on device', 'out/x')\n"
        "def interrupted(argv):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "disk-full", ("fake_cmds:disk_full", ""))
    monkeypatch.setitem(cli.COMMANDS, "interrupted", ("fake_cmds:interrupted", ""))
    assert m2vla(["disk-full"]) == 2
    assert _one_error_line(capsys).startswith("m2vla disk-full: [Errno 28] No space left on device")
    with pytest.raises(KeyboardInterrupt):
        m2vla(["interrupted"])
    sys.modules.pop("fake_cmds", None)


def test_a_file_given_where_a_directory_belongs_or_the_reverse_is_refused_with_exit_2(tmp_path, a_file, capsys):
    ckpt = tmp_path / "no_ckpt"  # every check below runs before the checkpoint / dataset is read
    cases = [
        (["export", str(ckpt), "--out", str(tmp_path)], "is a directory"),
        (["export", str(ckpt), "--out", str(a_file / "x.onnx")], "is a file"),
        (["record", "--out", str(a_file), "--tasks", "reach_above", "--episodes-per-task", "1"], "is a file"),
        (["features", "--data", str(a_file), "--out", str(tmp_path / "f")], "not a LeRobot dataset"),
        (["train", "--data", str(tmp_path / "no_data"), "--out", str(a_file)], "is a file"),
        (["pack", "route", "--policy", str(ckpt), "--json", str(tmp_path)], "is a directory"),
    ]
    for argv, message in cases:
        assert m2vla(argv) == 2, argv
        _one_error_line(capsys, f"m2vla {argv[0]}", message)
    data = tmp_path / "data"
    (data / "meta").mkdir(parents=True)
    (data / "meta" / "info.json").write_text("{}")
    assert m2vla(["features", "--data", str(data), "--out", str(a_file)]) == 2  # before the backbone loads
    _one_error_line(capsys, "m2vla features", str(a_file), "is a file")


# 3 ------------------------------------------------------------------------- --backbone paths
def test_a_missing_local_backbone_path_is_refused_at_once_and_never_sent_to_the_hub(tmp_path, a_file, monkeypatch):
    from m2vla_core.backbone.adapter import FrozenBackbone, _looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained",
                        lambda *a, **k: pytest.fail("a local-looking path reached transformers"))
    for source in ("/nonexistent/backbone", "out/backbone", "./backbone", "~/no_such_backbone_dir"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            FrozenBackbone.from_pretrained(source)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        FrozenBackbone.from_pretrained(a_file)
    assert not _looks_like_path("Qwen/Qwen2-VL-2B-Instruct")  # hub ids stay hub ids


# 4 ------------------------------------------------------------------------- damaged model.onnx
def test_a_damaged_onnx_model_or_a_file_as_policy_is_a_checkpoint_error_and_eval_exits_2(tmp_path, a_file, capsys):
    from m2vla_core.export.runtime import OnnxHeadRuntime

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.onnx").write_bytes(b"\x00garbage, not a protobuf\xff" * 8)
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxHeadRuntime(ckpt)
    with pytest.raises(CheckpointError, match=str(a_file)):
        OnnxHeadRuntime(a_file)
    assert m2vla(["eval", "--policy", str(ckpt), "--episodes", "1", "--max-steps", "2", "--tasks", "reach_above",
                  "--no-progress"]) == 2
    _one_error_line(capsys, "m2vla eval", "model.onnx", "not a loadable ONNX model")


# 5 ------------------------------------------------------------------------- safetensors header
def _safetensors_with_header(path: Path, header) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
    return path


@pytest.mark.parametrize("header", [
    {"a": {"dtype": "F32", "shape": [1]}},  # no data_offsets
    {"a": [0, 4]},  # an entry that is a list
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
    {"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}},
    {"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
], ids=["no_data_offsets", "list_entry", "one_offset", "string_shape", "list_metadata"])
def test_a_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, header):
    path = _safetensors_with_header(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match="damaged safetensors header"):
        check_safetensors_file(path)


def test_a_well_formed_safetensors_header_still_passes(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    assert check_safetensors_file(_safetensors_with_header(tmp_path / "model.safetensors", header)) == header


# 6, 7 --------------------------------------------------------------------- train
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step run on a tiny synthetic feature dataset: (data dir, checkpoint dir, RunConfig)."""
    from m2vla_core.heads.factory import small_head_config
    from m2vla_core.training.synthetic import write_synthetic_dataset
    from m2vla_core.training.trainer import RunConfig, TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_run")
    head_config = small_head_config("mol+mlp")
    write_synthetic_dataset(root / "data", contract=head_config.contract, num_episodes=2, episode_len=8)
    run = RunConfig(arch=head_config.arch, preset="mol+mlp",
                    train=TrainConfig(steps=2, batch_size=4, warmup_steps=0, val_fraction=0.0, ckpt_every=1000))
    train(root / "data", root / "ckpt", run, progress=False, plot=False)
    return root / "data", root / "ckpt", run


def test_train_refuses_stop_after_below_1_and_steps_below_the_resumed_step(tiny_run, tmp_path):
    import dataclasses

    from m2vla_core.training.trainer import train

    data, ckpt, run = tiny_run
    with pytest.raises(ValueError, match=r"stop_after.*-1"):
        train(data, tmp_path / "new", run, progress=False, plot=False, stop_after=-1)
    assert not (tmp_path / "new").exists()  # no untrained checkpoint
    before = (ckpt / "train.json").read_text()
    shorter = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=1))
    with pytest.raises(ValueError, match=r"TrainConfig\.steps.*1.*step 2"):
        train(data, ckpt, shorter, resume=True, progress=False, plot=False)
    assert (ckpt / "train.json").read_text() == before


def test_resume_without_train_json_or_its_history_is_a_checkpoint_error_naming_the_file(tiny_run, tmp_path, capsys):
    import shutil

    from m2vla_core.training.trainer import read_run_record

    data, ckpt, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    record = json.loads((broken / "train.json").read_text())
    del record["history"]
    (broken / "train.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"train\.json.*history"):
        read_run_record(broken)
    assert m2vla(["train", "--data", str(data), "--out", str(broken), "--resume", "--no-progress"]) == 2
    _one_error_line(capsys, "m2vla train", str(broken / "train.json"), "history")
    (broken / "train.json").unlink()
    assert m2vla(["train", "--data", str(data), "--out", str(broken), "--resume", "--no-progress"]) == 2
    _one_error_line(capsys, "m2vla train", "train.json missing")


# 8 ------------------------------------------------------------------------- task lists
def test_a_task_named_twice_is_refused_naming_it(capsys):
    from m2vla_core.sim.tasks import parse_task_list

    with pytest.raises(ValueError, match="reach_above more than once"):
        parse_task_list("reach_above, pick_lift,reach_above")
    assert m2vla(["eval", "--tasks", "reach_above,reach_above", "--episodes", "1", "--max-steps", "2"]) == 2
    _one_error_line(capsys, "m2vla eval", "reach_above more than once")


# 9 ------------------------------------------------------------------------- make-tiny-vlm
def test_make_tiny_vlm_refuses_a_non_empty_directory_and_a_negative_seed(tmp_path, a_file, capsys):
    head = tmp_path / "head_ckpt"
    head.mkdir()
    (head / "config.json").write_text('{"keep": true}')
    assert m2vla(["make-tiny-vlm", str(head)]) == 2
    _one_error_line(capsys, "m2vla make-tiny-vlm", str(head), "not empty", "--overwrite")
    assert (head / "config.json").read_text() == '{"keep": true}' and len(list(head.iterdir())) == 1
    assert m2vla(["make-tiny-vlm", str(tmp_path / "new"), "--seed", "-1"]) == 2
    _one_error_line(capsys, "seed", "-1")
    assert not (tmp_path / "new").exists()
    assert m2vla(["make-tiny-vlm", str(a_file)]) == 2
    _one_error_line(capsys, str(a_file), "is a file")


def test_make_tiny_vlm_overwrite_writes_into_a_non_empty_directory(tmp_path, monkeypatch):
    from m2vla_core.backbone.tiny import MANIFEST_NAME

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "notes.txt").write_text("kept")
    assert m2vla(["make-tiny-vlm", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / MANIFEST_NAME).is_file() and (tmp_path / "notes.txt").read_text() == "kept"


# 10 ------------------------------------------------------------------------ pack counts
def test_pack_refuses_zero_episodes_and_zero_threads_before_loading_anything(tmp_path, capsys):
    from m2vla_core.packs.evaluation import router_accuracy

    missing = str(tmp_path / "no_set")  # would fail to load: the count is checked first
    assert m2vla(["pack", "route", "--policy", missing, "--episodes", "0"]) == 2
    _one_error_line(capsys, "m2vla pack route", "--episodes", "0")
    assert m2vla(["pack", "--threads", "0", "route", "--policy", missing]) == 2
    _one_error_line(capsys, "--threads", "0")
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        router_accuracy(missing, episodes=0, progress=False)
