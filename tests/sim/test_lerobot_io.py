"""LeRobot v2.1 recording and loading: exact round trip, CLI, foreign feature names."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from m2vla_core.sim import ExpertConfig, SimConfig, TaskEnv
from m2vla_core.sim.lerobot_io import Episode, FeatureNames, LeRobotWriter, load_lerobot_episodes
from m2vla_core.sim.record import RecordConfig, cli_main, record_dataset, record_episode


@pytest.fixture(scope="module")
def recorded():
    with TaskEnv(SimConfig(image_width=32, image_height=32)) as env:
        return record_episode(env, "reach_above", 0, ExpertConfig()), list(env.state_names)


def _writer(root, names=None, ee_pose=True, **kw):
    return LeRobotWriter(root, fps=10.0, image_shape=(32, 32, 3), state_names=[f"s{i}" for i in range(8)],
                         action_names=[f"a{i}" for i in range(8)], names=names, ee_pose=ee_pose, **kw)


def test_recorded_episode_round_trips_exactly(tmp_path, recorded):
    episode, _ = recorded
    assert episode.success and len(episode) > 5
    with _writer(tmp_path / "ds") as writer:
        assert writer.add_episode(episode) == 0
        assert writer.add_episode(episode) == 1
    back = load_lerobot_episodes(tmp_path / "ds")
    assert [e.index for e in back] == [0, 1]
    got = back[1]
    assert got.frames.dtype == np.uint8 and np.array_equal(got.frames, episode.frames)
    assert np.array_equal(got.states, episode.states) and np.array_equal(got.actions, episode.actions)
    assert np.array_equal(got.ee_poses, episode.ee_poses) and np.array_equal(got.timestamps, episode.timestamps)
    assert (got.instruction, got.task, got.seed, got.success) == (episode.instruction, "reach_above", 0, True)
    assert got.fps == 10.0


def test_written_dataset_follows_the_lerobot_v21_layout(tmp_path, recorded):
    episode, _ = recorded
    with _writer(tmp_path) as writer:
        writer.add_episode(episode)
    info = json.loads((tmp_path / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1"
    assert info["total_episodes"] == 1 and info["total_frames"] == len(episode) and info["total_tasks"] == 1
    assert info["features"]["observation.images.front"]["dtype"] == "image"
    assert info["features"]["observation.state"]["shape"] == [8]
    assert json.loads((tmp_path / "meta/tasks.jsonl").read_text()) == {"task_index": 0, "task": episode.instruction}
    assert (tmp_path / "meta/episodes_stats.jsonl").exists() and (tmp_path / "meta/stats.json").exists()
    table = pq.read_table(tmp_path / "data/chunk-000/episode_000000.parquet")
    assert {"observation.images.front", "observation.state", "action", "timestamp", "frame_index",
            "episode_index", "index", "task_index"} <= set(table.column_names)
    cell = table.column("observation.images.front")[0].as_py()
    assert cell["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    hf = json.loads(table.schema.metadata[b"huggingface"])
    assert hf["info"]["features"]["observation.images.front"] == {"_type": "Image"}


def test_dataset_with_other_feature_names_is_read_through_a_name_map(tmp_path, recorded):
    episode, _ = recorded
    theirs = FeatureNames(image="observation.images.top", state="observation.joints", action="action.joints",
                          wrist_image="", ee_pose="")
    with _writer(tmp_path, names=theirs, ee_pose=False) as writer:
        writer.add_episode(Episode(instruction="do it", frames=episode.frames, states=episode.states,
                                   actions=episode.actions, fps=10.0))
    with pytest.raises(KeyError, match="did you mean 'observation.images.top'"):
        load_lerobot_episodes(tmp_path)
    (got,) = load_lerobot_episodes(tmp_path, names=theirs)
    assert np.array_equal(got.frames, episode.frames) and got.instruction == "do it"
    assert got.ee_poses is None and got.task == "" and got.seed is None


def test_writer_refuses_to_overwrite_an_existing_dataset(tmp_path, recorded):
    with _writer(tmp_path) as writer:
        writer.add_episode(recorded[0])
    with pytest.raises(FileExistsError):
        _writer(tmp_path)


def test_a_ctrl_c_right_after_an_episode_is_committed_still_counts_it(tmp_path, recorded, monkeypatch):
    episode, _ = recorded
    append_line = LeRobotWriter._append_line

    def interrupted_after_the_commit(self, name, record):
        append_line(self, name, record)
        if name == "episodes.jsonl" and record["episode_index"] == 1:
            raise KeyboardInterrupt  # the line is on disk, the writer's bookkeeping is not

    writer = _writer(tmp_path)
    writer.add_episode(episode)
    monkeypatch.setattr(LeRobotWriter, "_append_line", interrupted_after_the_commit)
    with pytest.raises(KeyboardInterrupt):
        writer.add_episode(episode)
    writer.close()
    info = json.loads((tmp_path / "meta/info.json").read_text())
    assert len(load_lerobot_episodes(tmp_path)) == info["total_episodes"] == 2
    assert info["total_frames"] == 2 * len(episode)
    stats = json.loads((tmp_path / "meta/stats.json").read_text())
    assert stats["observation.state"]["count"] == [2 * len(episode)]


def test_a_last_line_cut_short_is_an_uncommitted_episode_and_other_bad_lines_are_errors(tmp_path, recorded, caplog):
    episode, _ = recorded
    with _writer(tmp_path) as writer:
        writer.add_episode(episode)
        writer.add_episode(episode)
    episodes_file = tmp_path / "meta/episodes.jsonl"
    lines = episodes_file.read_text()
    episodes_file.write_text(lines + '{"episode_index": 2, "tas')  # killed while appending a third commit
    with caplog.at_level(logging.WARNING, logger="m2vla_core.sim.lerobot_io"):
        assert [e.index for e in load_lerobot_episodes(tmp_path)] == [0, 1]
    assert "cut short" in caplog.text
    episodes_file.write_text(lines.replace("\n", "\nnot json\n", 1))
    with pytest.raises(ValueError, match=r"episodes.jsonl:2: not a JSON line"):
        load_lerobot_episodes(tmp_path)


def test_a_recording_killed_outright_stays_readable_and_says_it_was_interrupted(tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-c", "import sys; from m2vla_core.sim.record import cli_main; sys.exit(cli_main("
               "sys.argv[1:]))", "--out", str(out), "--tasks", "reach_above", "--episodes-per-task", "50",
               "--image-size", "32", "--seed-offset", "300", "--no-progress"]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commits = out / "meta/episodes.jsonl"
    deadline = time.monotonic() + 120
    while recorder.poll() is None and time.monotonic() < deadline:
        if commits.exists() and commits.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    recorder.send_signal(signal.SIGKILL)  # no handler, no finally: only what is on disk counts
    _, stderr = recorder.communicate(timeout=30)
    assert recorder.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    episodes = load_lerobot_episodes(out)
    assert len(episodes) >= 2 and [e.seed for e in episodes] == list(range(300, 300 + len(episodes)))
    info = json.loads((out / "meta/info.json").read_text())
    assert info["m2vla"]["interrupted"] is True
    assert len(episodes) - 1 <= info["total_episodes"] <= len(episodes)  # at most the commit in flight behind
    assert info["m2vla"]["seeds"]["reach_above"] == [e.seed for e in episodes][:info["total_episodes"]]
    with pytest.raises(FileExistsError):  # a rerun into the same directory does not clobber what was kept
        LeRobotWriter(out, fps=10.0, image_shape=(32, 32, 3), state_names=["s"], action_names=["a"])


def test_record_cli_writes_successful_expert_episodes(tmp_path):
    out = tmp_path / "demo"
    rc = cli_main(["--out", str(out), "--tasks", "reach_above", "--episodes-per-task", "2", "--image-size", "32",
                   "--seed-offset", "100", "--no-progress"])
    assert rc == 0
    episodes = load_lerobot_episodes(out)
    assert [e.seed for e in episodes] == [100, 101]
    assert all(e.success and e.task == "reach_above" and e.frames.shape[1:] == (32, 32, 3) for e in episodes)
    info = json.loads((out / "meta/info.json").read_text())
    assert info["m2vla"]["seeds"] == {"reach_above": [100, 101]} and info["fps"] == 10.0
    assert info["m2vla"]["interrupted"] is False


def test_an_interrupted_recording_keeps_its_finished_episodes_and_says_it_was_interrupted(tmp_path):
    calls = []

    def interrupted_after_two(env, task, seed, expert_config):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third episode
        return record_episode(env, task, seed, expert_config)

    out = tmp_path / "partial"
    config = RecordConfig(out=out, tasks=("reach_above", "pick_lift"), episodes_per_task=5, seed_offset=40)
    with pytest.raises(KeyboardInterrupt):
        record_dataset(config, SimConfig(image_width=32, image_height=32), progress=False,
                       source=interrupted_after_two)
    assert [e.seed for e in load_lerobot_episodes(out)] == [40, 41]
    info = json.loads((out / "meta/info.json").read_text())
    assert info["total_episodes"] == 2 and info["m2vla"]["interrupted"] is True
    assert info["m2vla"]["seeds"] == {"reach_above": [40, 41]}


def test_record_cli_repeats_each_layout_with_its_own_noise(tmp_path):
    out = tmp_path / "repeats"
    rc = cli_main(["--out", str(out), "--tasks", "reach_above", "--episodes-per-task", "1", "--repeats", "3",
                   "--noise", "0.02", "--image-size", "32", "--seed-offset", "7", "--no-progress"])
    assert rc == 0
    episodes = load_lerobot_episodes(out)
    assert [e.seed for e in episodes] == [7, 7, 7]
    assert all(np.array_equal(e.states[0], episodes[0].states[0]) for e in episodes)  # one layout, one start
    assert len({e.states[: min(len(x.states) for x in episodes)].tobytes() for e in episodes}) == 3
    info = json.loads((out / "meta/info.json").read_text())
    assert info["m2vla"]["seeds"] == {"reach_above": [7]} and info["m2vla"]["repeats_per_seed"] == 3


def test_record_cli_rejects_an_unknown_task(tmp_path, capsys):
    assert cli_main(["--out", str(tmp_path / "x"), "--tasks", "stak", "--no-progress"]) == 2
    assert "did you mean 'stack'" in capsys.readouterr().err
