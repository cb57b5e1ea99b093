"""``VLAAgent``: the in-process policy the evaluation rolls out.

It runs exactly what the ROS graph runs, minus the transport: the camera frame and the
instruction go through the frozen backbone under the head's feature contract (perception
node), then ``HeadPolicy.infer(hidden, mask, joint state)`` gives the chunk (policy node).
So a success rate measured here is the success rate of the shipped nodes' model path.

A diagnostic head trained with ``m2vla features --privileged-state`` also reads the named
objects' true positions (``Observation.named_objects_xy``), optionally moved by a fixed error
to ask how precise perception would have to be. A head trained to predict them
(``--object-targets``) is asked, for every act, where it believed they were
(``object_errors_m``, outside the timed act): in closed loop, on layouts it never saw.

A privileged-state head with an object localiser beside it (``m2vla localiser --out CKPT``)
needs no simulator truth: at the first act after ``reset`` the localiser reads the named
objects' positions from the camera frame once, and every act of the episode gets them.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def object_position_head(checkpoint: str | os.PathLike, config):
    """The torch head of a checkpoint whose auxiliary targets are objects' x, y (every object's,
    or the named cube's and target's), else None.

    The ONNX graph holds only the action path; the position predictor is in the safetensors, so a
    checkpoint shipped as ONNX alone gets no belief diagnostic (logged, not an error).
    """
    from m2vla_core.heads.checkpoint import WEIGHTS_NAME, load_head
    from m2vla_core.sim.tasks import NAMED_OBJECT_XY_NAMES, OBJECT_XY_NAMES

    names = tuple(config.aux_target_names)
    if not names:
        return None
    if names not in (OBJECT_XY_NAMES, NAMED_OBJECT_XY_NAMES):
        log.warning("%s: auxiliary targets %s are not object positions; no belief diagnostic", checkpoint, names)
        return None
    if not (Path(checkpoint) / WEIGHTS_NAME).is_file():
        log.warning("%s: no model.safetensors beside the ONNX graph; the position predictor is not there, "
                    "no belief diagnostic", checkpoint)
        return None
    return load_head(checkpoint)


def named_object_belief(believed_xy: np.ndarray, keys: tuple[str, str]) -> np.ndarray:
    """(4,) the named cube's and target's x, y out of a prediction ordered by ``OBJECT_XY_NAMES``,
    or a prediction of the named ones alone (``NAMED_OBJECT_XY_NAMES``, taken as is)."""
    from m2vla_core.sim.tasks import NAMED_OBJECT_XY_NAMES, object_keys

    rows = np.asarray(believed_xy).reshape(-1, 2)  # (objects, 2)
    if len(rows) * 2 == len(NAMED_OBJECT_XY_NAMES):
        return rows.reshape(4)
    return np.concatenate([rows[object_keys().index(key)] for key in keys])


def perturb_named_objects(xy: np.ndarray, error_m: float) -> np.ndarray:
    """(4,) cube x, y + target x, y, each point moved by exactly ``error_m`` [m].

    The directions are drawn from the positions themselves, so one episode keeps one error (as a
    biased detector would) and a rerun of the same seeds draws the same errors. A target that is
    the cube itself moves with it.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if error_m == 0.0:
        return xy.astype(np.float32)
    angles = np.random.default_rng(zlib.crc32(xy.tobytes())).uniform(0.0, 2.0 * math.pi, size=2)
    if np.array_equal(xy[:2], xy[2:]):
        angles[1] = angles[0]
    offset = error_m * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (2 points, xy)
    return (xy + offset.reshape(4)).astype(np.float32)


class VLAAgent:
    """Frozen backbone + trained head behind the rollout ``Agent`` protocol (``reset`` / ``act``)."""

    def __init__(self, backbone, policy, *, privileged_error_m: float = 0.0, aux_head=None, localiser=None) -> None:
        from m2vla_core.heads.checkpoint import check_backbone
        from m2vla_core.sim.tasks import reads_privileged_state

        check_backbone(policy.config, backbone.backbone_id, backbone.weights_digest)
        backbone.check_contract(policy.config.contract)
        if not (math.isfinite(privileged_error_m) and privileged_error_m >= 0.0):
            raise ValueError(f"privileged_error_m must be finite and >= 0, got {privileged_error_m}")
        self.backbone = backbone
        self.policy = policy
        self.contract = policy.config.contract
        self.privileged = reads_privileged_state(policy.config.state_names)
        if privileged_error_m and not self.privileged:
            raise ValueError("a privileged error (--privileged-error-cm) needs a head trained on "
                             "`m2vla features --privileged-state`")
        self.privileged_error_m = privileged_error_m
        self.localiser = localiser
        self.reader = None  # runs the localiser on its own input size (NamedObjectReader)
        self._perceived_xy: np.ndarray | None = None  # the localiser's reading of this episode's first frame
        if localiser is not None:
            if not self.privileged:
                raise ValueError("an object localiser feeds the named objects' positions to a head trained on "
                                 "`m2vla features --privileged-state`; this head reads none")
            if privileged_error_m:
                raise ValueError("a privileged error applies to simulator truth; with a localiser the positions "
                                 "come from the camera")
            from m2vla_core.heads.localiser import NamedObjectReader

            self.reader = NamedObjectReader(localiser, backbone)
        self.backbone_ms: list[float] = []  # per act(): feature extraction time
        self.head_ms: list[float] = []  # per act(): head inference time
        self.localiser_ms: list[float] = []  # per episode: the localiser's one reading (its own backbone pass)
        # A head trained to predict the objects' x, y (``m2vla features --object-targets``) says
        # per act where it believes the named ones are; the sim knows where they are.
        self.aux_head = aux_head
        self._object_errors_m: list[tuple[float, float]] = []
        self._pending_beliefs: list[tuple] = []  # acts whose belief is not computed yet (see object_errors_m)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, *, backend: str = "onnxruntime", device: str = "cpu",
             backbone_path: str | os.PathLike | None = None, backbone=None,
             privileged_error_m: float = 0.0) -> "VLAAgent":
        """Load a head checkpoint (default: the shipped policy) or a pack set, and its backbone
        (``around``)."""
        from m2vla_core.assets_paths import default_policy_path
        from m2vla_core.export.runtime import HeadPolicy
        from m2vla_core.heads.localiser import has_localiser, load_localiser
        from m2vla_core.packs.configuration_packs import PACK_SET_NAME

        ckpt = Path(checkpoint) if checkpoint else default_policy_path()
        if (ckpt / PACK_SET_NAME).is_file():  # a routed set of skill packs (m2vla pack combine)
            from m2vla_core.packs import PackedPolicy

            policy = PackedPolicy.load(ckpt, backend=backend, device=device)
            aux_head = None
        else:
            policy = HeadPolicy.load(ckpt, backend=backend, device=device)
            aux_head = object_position_head(ckpt, policy.config)
        localiser = None
        if has_localiser(ckpt):
            localiser = load_localiser(ckpt, backbone=(policy.config.backbone_id, policy.config.backbone_digest))
        agent = cls.around(policy, device=device, backbone_path=backbone_path, backbone=backbone,
                           privileged_error_m=privileged_error_m, localiser=localiser)
        agent.aux_head = aux_head
        return agent

    @classmethod
    def around(cls, policy, *, device: str = "cpu", backbone_path: str | os.PathLike | None = None, backbone=None,
               privileged_error_m: float = 0.0, localiser=None) -> "VLAAgent":
        """An agent for a loaded head or pack set: the backbone it was trained on is loaded at the
        input size its contract names (a given ``backbone`` is checked against it in ``__init__``)."""
        from m2vla_core.backbone.adapter import FrozenBackbone
        from m2vla_core.backbone.tiny import default_backbone_path

        if backbone is None:
            backbone = FrozenBackbone.from_pretrained(backbone_path or default_backbone_path(), device=device,
                                                      image_size=policy.config.contract.image_size or None)
        return cls(backbone, policy, privileged_error_m=privileged_error_m, localiser=localiser)

    def sim_config(self):
        """Simulator settings for this head: its control period, and camera frames of the input
        size its contract names (the camera's default size when it names none), or of the
        localiser's when that is larger: the head's backbone then downsizes them, which matches
        training only if the head's recording was rendered at that size too."""
        from m2vla_core.sim import SimConfig

        size = self.contract.image_size
        if self.localiser is not None:
            size = max(size or SimConfig().image_width, self.localiser.config.image_size)
        return SimConfig(control_dt_s=float(self.policy.config.dt_s),
                         **({"image_width": size, "image_height": size} if size else {}))

    @property
    def chunk_len(self) -> int:
        return int(self.policy.config.chunk_len)

    def reset(self) -> None:
        self.policy.reset()
        self._perceived_xy = None

    def act(self, observation) -> np.ndarray:
        """Observation (image, instruction, joint_positions) -> chunk (H, A) of joint-position targets."""
        if observation.image is None:
            raise ValueError("VLAAgent needs camera images: SimConfig.render must be True")
        if self.localiser is not None and self._perceived_xy is None:
            t0 = time.perf_counter()
            self._perceived_xy = self.perceive(observation.image, observation.instruction)
            self.localiser_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        bundle = self.backbone.extract(observation.image, observation.instruction, self.contract)
        hidden, mask = bundle.numpy()  # (n_layers, T, D), (T,)
        t1 = time.perf_counter()
        state = self.state(observation)
        chunk = self.policy.infer(hidden, mask, state)  # (H, A)
        t2 = time.perf_counter()
        self.backbone_ms.append((t1 - t0) * 1e3)
        self.head_ms.append((t2 - t1) * 1e3)
        if self.localiser is not None and observation.named_objects_xy is not None:
            error = (self._perceived_xy - np.asarray(observation.named_objects_xy)).reshape(2, 2)
            self._object_errors_m.append(tuple(float(e) for e in np.hypot(error[:, 0], error[:, 1])))
        elif self.aux_head is not None and observation.named_objects_xy is not None and observation.named_object_keys:
            self._pending_beliefs.append((hidden, mask, state, np.asarray(observation.named_objects_xy),
                                          tuple(observation.named_object_keys)))
        return chunk

    @property
    def object_errors_m(self) -> list[tuple[float, float]]:
        """Per act(): (cube, target) distance [m] between where the head (or its localiser) believes
        the named objects are and where they were at the episode's start. Computed when read, so the
        head's diagnostic stays out of act()'s latency."""
        for hidden, mask, state, true_xy, keys in self._pending_beliefs:
            believed = self.aux_head.predict_aux(torch.as_tensor(hidden)[None], torch.as_tensor(mask)[None],
                                                 torch.as_tensor(state)[None])[0].numpy()  # (2 * objects,)
            error = (named_object_belief(believed, keys) - true_xy).reshape(2, 2)  # rows: cube, target
            self._object_errors_m.append(tuple(float(e) for e in np.hypot(error[:, 0], error[:, 1])))
        self._pending_beliefs.clear()
        return self._object_errors_m

    def perceive(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """(4,) the named cube's and target's x, y [m] as the localiser reads them from ``image``."""
        return self.reader.read(image, instruction)

    def state(self, observation) -> np.ndarray:
        """(S,) the head's state input: the joints, then the named objects' positions if it reads
        them (from the localiser when it has one, else the simulator's privileged truth)."""
        joints = np.asarray(observation.joint_positions, dtype=np.float32)
        if not self.privileged:
            return joints
        if self.localiser is not None:
            if self._perceived_xy is None:  # asked before the episode's first act
                self._perceived_xy = self.perceive(observation.image, observation.instruction)
            return np.concatenate([joints, self._perceived_xy])
        if observation.named_objects_xy is None:
            raise ValueError("this head reads privileged state, and the observation carries no named_objects_xy")
        return np.concatenate([joints, perturb_named_objects(observation.named_objects_xy, self.privileged_error_m)])
