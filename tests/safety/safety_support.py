"""Helpers shared by the safety tests and ``m2vla soak`` checks: a test policy, constants, checks.

``build_random_policy``: a random-weight head checkpoint that fits the shipped tiny backbone.
Its actions are centred on the Panda home pose with a small spread, so the controller accepts
its chunks (inside the joint limits, below the speed cap) and the arm moves a little: enough
to tell motion from a hold, never enough to leave the workspace. Used until (and beside) the
shipped trained policy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import os

import numpy as np

HOME = np.array([0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785, 0.04])  # 7 arm joints [rad] + gripper opening [m]
ACTION_STD = np.array([0.05] * 7 + [0.004])  # spread of the random actions around HOME
COMMAND_PERIOD_S = 1.0 / 250.0  # controller.yaml command_rate_hz
VELOCITY_LIMIT = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61, 0.5])  # controller.yaml
TEST_FRAME = "m2vla_safety_test"  # frame_id of the bad messages the tests publish (filtered from recordings)


def safety_domain_id(offset: int = 0) -> int:
    """A DDS domain for this run (222..232 is left alone by the other suites' pid-based choices)."""
    return 222 + (os.getpid() + offset) % 11


def assert_no_jump(stamped: np.ndarray, slack: float = 1.05) -> None:
    """(N, 1 + 8) rows of [stamp_s, command...] as received: between consecutive commands no joint
    moves further than its velocity limit allows in the time between their stamps plus one command
    period. The extra period absorbs stamp jitter and commands this subscriber missed (keep-last 1
    on a loaded machine); a seam jump or a replayed stale command is tens of periods."""
    assert len(stamped) > 1, "no commands to check"
    dt = np.maximum(np.diff(stamped[:, 0]), COMMAND_PERIOD_S)[:, None]  # (N-1, 1) [s]
    steps = np.abs(np.diff(stamped[:, 1:], axis=0))  # (N-1, 8)
    allowed = VELOCITY_LIMIT * (dt + COMMAND_PERIOD_S) * slack  # (N-1, 8)
    ratio = steps / allowed
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    assert ratio.max() <= 1.0, (f"joint {worst[1]} moved {steps[worst]:.4f} in {dt[worst[0], 0] * 1e3:.1f} ms "
                                f"(allowed {allowed[worst]:.4f}): a jump")


def build_random_policy(directory: str | Path, *, seed: int = 0, export: bool = True, joints: int = 8,
                        object_positions: bool = False, localiser: bool = True) -> Path:
    """Write config.json + model.safetensors (+ model.onnx when ``export``) into ``directory``.

    ``joints`` != 8: a head for an arm of that many unnamed joints (its config has no joint
    names, so the Panda graph cannot drive it: a checkpoint the policy node must refuse).
    ``object_positions``: the head's state ends with the named objects' x, y
    (``PRIVILEGED_STATE_NAMES``), and a random object localiser (56 px frames) is written beside
    it unless ``localiser`` is False."""
    import torch

    from m2vla_core.backbone import FrozenBackbone, default_backbone_path
    from m2vla_core.export.onnx_export import export_onnx
    from m2vla_core.heads import save_head
    from m2vla_core.heads.factory import small_head_config
    from m2vla_core.heads.policy_head import PolicyHead

    backbone = FrozenBackbone.from_pretrained(str(default_backbone_path()))
    contract = backbone.contract((2, 4, 6), num_image_tokens=16, num_text_tokens=16)
    from m2vla_core.sim.tasks import PRIVILEGED_STATE_NAMES

    extra = PRIVILEGED_STATE_NAMES if object_positions else ()
    config = small_head_config("mol+mlp", layers=contract.layers, num_image_tokens=contract.num_image_tokens,
                               num_text_tokens=contract.num_text_tokens, width=contract.width,
                               state_dim=joints + len(extra), action_dim=joints)
    config = replace(config, contract=contract, backbone_id=backbone.backbone_id,
                     backbone_digest=backbone.weights_digest)
    if object_positions:
        from m2vla_core.policy_engine import DEFAULT_STATE_NAMES

        config = replace(config, state_names=(*DEFAULT_STATE_NAMES, *extra))
    torch.manual_seed(seed)
    head = PolicyHead(config).eval()
    if joints == 8:
        state_mean, state_std = np.r_[HOME, np.zeros(len(extra))], np.full(8 + len(extra), 0.5)
        head.normalizer.set_stats(state_mean, state_std, HOME, ACTION_STD)
    else:
        head.normalizer.set_stats(np.zeros(joints), np.ones(joints), np.zeros(joints), np.full(joints, 0.01))
    directory = Path(directory)
    save_head(head, directory)
    if object_positions and localiser:
        from m2vla_core.heads.localiser import LocaliserConfig, ObjectLocaliser, save_localiser
        from m2vla_core.sim.tasks import object_keys

        save_localiser(ObjectLocaliser(LocaliserConfig(backbone_id=backbone.backbone_id,
                                                       backbone_digest=backbone.weights_digest,
                                                       object_keys=object_keys(), image_size=56, num_image_tokens=4)),
                       directory)
    if export:
        result = export_onnx(directory)
        if not result.ok:
            raise RuntimeError(f"ONNX export of the test head failed: {result}")
    return directory
