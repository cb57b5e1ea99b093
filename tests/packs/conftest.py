"""Module fixtures: a few recorded episodes of two tasks -> small features -> two tiny packs -> a set.

Everything is real (PyBullet expert demos, the shipped tiny Qwen2-VL backbone, the normal
trainer); only the sizes are small: 8 episodes per task, 2 backbone layers, 4 pooled image
tokens, heads of width 32 trained for a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TASKS = ("reach_above", "push_to_zone")
PACKS = {"reach": ("reach_above",), "push": ("push_to_zone",)}
EPISODES_PER_TASK = 8  # demos per task (seeds 0..7); held-out checks use seeds 1000..
CHUNK_LEN = 8
SAMPLE_EVERY = 4  # demo steps per training sample


@pytest.fixture(scope="module")
def backbone():
    """The shipped tiny backbone, run on one torch thread (the machine's cores are shared)."""
    import torch

    from m2vla_core.backbone.adapter import FrozenBackbone
    from m2vla_core.backbone.tiny import default_backbone_path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield FrozenBackbone.from_pretrained(default_backbone_path())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory, backbone) -> Path:
    """Expert demos of TASKS (seeds 0..) as a real feature dataset, cheaply.

    The expert runs without rendering; each episode's first observation is rendered and put
    through the backbone (exactly what the router sees at run time), and every 4th step of the
    demo becomes a training sample with that first frame's features, the step's joint state
    and the expert's next H actions. Enough for packs that train, save and route.
    """
    from m2vla_core.backbone.cli import future_chunks
    from m2vla_core.sim import ExpertConfig, SimConfig, TaskEnv, run_expert_episode, task_names
    from m2vla_core.training.feature_dataset import FeatureDatasetMeta, FeatureDatasetWriter

    out = tmp_path_factory.mktemp("packs_data") / "features"
    contract = backbone.contract((1, 2), num_image_tokens=4, num_text_tokens=8)
    names = tuple(task_names())
    meta = FeatureDatasetMeta(contract=contract, state_dim=8, action_space="joint", action_dim=8, chunk_len=CHUNK_LEN,
                              dt_s=0.1, backbone_id=backbone.backbone_id, backbone_digest=backbone.weights_digest,
                              hidden_dtype="float32", task_names=names)
    episode = 0
    with TaskEnv(SimConfig(render=False)) as expert_env, TaskEnv(SimConfig()) as camera, \
            FeatureDatasetWriter(out, meta) as writer:
        for task in TASKS:
            for seed in range(EPISODES_PER_TASK):
                states, actions = [], []

                def keep(obs, action, executed) -> None:
                    if action is not None:
                        states.append(obs.joint_positions)
                        actions.append(action)

                run_expert_episode(expert_env, task, seed, ExpertConfig(), on_step=keep)
                first = camera.reset(task, seed)
                hidden, mask = backbone.extract(first.image, first.instruction, contract).numpy()  # (L, T, D), (T,)
                rows = np.arange(0, len(actions), SAMPLE_EVERY)
                n = len(rows)
                writer.add(np.repeat(hidden[None], n, 0), np.repeat(mask[None], n, 0), np.asarray(states, np.float32)[rows],
                           future_chunks(np.asarray(actions), CHUNK_LEN)[rows], np.full(n, episode),
                           np.full(n, names.index(task)))
                episode += 1
    return out


def tiny_run(steps: int = 30):
    from m2vla_core.heads.factory import small_head_config
    from m2vla_core.training.trainer import RunConfig, TrainConfig

    arch = small_head_config("mol+mlp").arch
    return RunConfig(arch=arch, train=TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=5, val_fraction=0.0,
                                                  ckpt_every=1000), preset="mol+mlp")


@pytest.fixture(scope="module")
def pack_dirs(tmp_path_factory, feature_dir) -> dict[str, Path]:
    from m2vla_core.packs import train_pack
    from m2vla_core.training.feature_dataset import FeatureDataset

    root = tmp_path_factory.mktemp("packs")
    data = FeatureDataset(feature_dir)
    out = {}
    for name, tasks in PACKS.items():
        train_pack(data, root / name, name, tasks, tiny_run(), work_dir=root / f"{name}.data")
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def pack_set(tmp_path_factory, pack_dirs) -> Path:
    from m2vla_core.packs import combine_packs

    out = tmp_path_factory.mktemp("sets") / "reach_push"
    combine_packs([pack_dirs["reach"], pack_dirs["push"]], out, min_confidence=0.6)
    return out
