"""Policy engine: a loaded head (or a routed set of skill packs) behind one small object.

The policy ROS node converts messages and calls this; nothing here imports ROS. ``load``
validates everything before it swaps: a refused checkpoint leaves the running head in place,
and the error carries the ``LoadPolicy`` service code so the node can answer without
guessing. ``infer`` returns a chunk or ``None`` (a refusal whose reason is in
``refusal_reason``, e.g. a router that is not confident enough) and never a silent wrong action:
non-finite output is a refusal too.

A head that reads the named objects' positions (trained with ``m2vla features
--privileged-state``) loads only with an object localiser in its checkpoint directory
(``m2vla localiser``): ``localiser_dir`` names it, perception reads the positions with it, and
``infer`` refuses to act without them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from m2vla_core.kinematics import ARM_JOINTS

# LoadPolicy.Request codes (m2vla_msgs/srv/LoadPolicy.srv); duplicated here because core never imports ROS.
OK, NOT_FOUND, INVALID_CHECKPOINT, CONTRACT_MISMATCH, BACKEND_ERROR = 0, 1, 2, 3, 4
DEFAULT_STATE_NAMES = (*ARM_JOINTS, "gripper_opening")
PACK_SET_FILE = "packs.json"
BACKENDS = ("onnxruntime", "torch")


class PolicyLoadError(RuntimeError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def default_policy_path() -> Path:
    """The shipped tiny-backbone MoL+MSM checkpoint (what ``make demo`` runs)."""
    from m2vla_core.assets_paths import default_policy_path as shipped

    return Path(shipped())


class PolicyEngine:
    """Holds at most one policy; ``load`` swaps atomically, ``infer`` runs it."""

    base_frame = "panda_link0"

    def __init__(self) -> None:
        self._policy = None
        self._lock = threading.Lock()
        self._kinematics = None
        self._instruction_id: int | None = None
        self.checkpoint = ""
        self.backend = ""
        self.localiser_dir = ""  # the object localiser the loaded head's state needs ("" = it reads none)
        self.refusal_reason = ""

    # -- loading ------------------------------------------------------------------------------
    def load(self, checkpoint: str | os.PathLike = "", *, backend: str = "onnxruntime", device: str = "cpu",
             expected_backbone_digest: str = "") -> None:
        """Load ``checkpoint`` ("" = the shipped policy); raise PolicyLoadError and keep the old one on failure.

        ``expected_backbone_digest``: weights digest of the backbone perception runs (when known);
        a head trained on other weights would read features it has never seen, so it is refused.
        """
        backend = backend or "onnxruntime"
        if backend not in BACKENDS:
            raise PolicyLoadError(BACKEND_ERROR, f"backend must be one of {BACKENDS}, got {backend!r}")
        try:
            path = Path(checkpoint) if str(checkpoint) else default_policy_path()
        except (ImportError, FileNotFoundError) as exc:
            raise PolicyLoadError(NOT_FOUND, f"no shipped policy in this install: {exc}") from None
        if not path.exists():
            raise PolicyLoadError(NOT_FOUND, f"{path}: no such checkpoint")
        policy = self._build(path, backend, device)
        localiser_dir = self._localiser_for(path, policy.config)
        digest = policy.config.backbone_digest
        if expected_backbone_digest and digest != expected_backbone_digest:
            raise PolicyLoadError(CONTRACT_MISMATCH, f"{path}: trained on backbone weights {digest[:12]}…, perception runs "
                                                     f"{expected_backbone_digest[:12]}…")
        with self._lock:
            self._policy, self.checkpoint, self.backend = policy, str(path), backend
            self.localiser_dir = localiser_dir
            self._instruction_id = None
            self.refusal_reason = ""

    @staticmethod
    def _build(path: Path, backend: str, device: str):
        from m2vla_core.config_io import ConfigError
        from m2vla_core.heads.checkpoint import CheckpointError

        is_pack_set = path.is_dir() and (path / PACK_SET_FILE).is_file()
        try:
            if is_pack_set:
                from m2vla_core.packs import PackedPolicy

                return PackedPolicy.load(path, backend=backend, device=device)
            from m2vla_core.export.runtime import HeadPolicy

            return HeadPolicy.load(path, backend=backend, device=device)
        except (CheckpointError, ConfigError) as exc:
            raise PolicyLoadError(INVALID_CHECKPOINT, f"{path}: {exc}") from None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise PolicyLoadError(INVALID_CHECKPOINT, f"{path}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime / torch raise their own types
            raise PolicyLoadError(BACKEND_ERROR, f"{path}: {backend} could not build the runtime: "
                                                 f"{type(exc).__name__}: {exc}") from None

    @staticmethod
    def _localiser_for(path: Path, config) -> str:
        """The localiser directory a head reading the named objects' positions needs ("" for any
        other head); PolicyLoadError when it has none or a broken one."""
        from m2vla_core.heads.checkpoint import CheckpointError
        from m2vla_core.heads.localiser import has_localiser, load_localiser
        from m2vla_core.sim.tasks import PRIVILEGED_STATE_NAMES, reads_privileged_state

        try:
            if not reads_privileged_state(config.state_names):
                return ""
        except ValueError as exc:
            raise PolicyLoadError(INVALID_CHECKPOINT, f"{path}: {exc}") from None
        if not (path.is_dir() and has_localiser(path)):
            raise PolicyLoadError(INVALID_CHECKPOINT, f"{path}: the head reads the named objects' positions "
                                                      f"{PRIVILEGED_STATE_NAMES} and the checkpoint holds no object "
                                                      f"localiser to read them from the camera (`m2vla localiser "
                                                      f"--out {path}`); without one it is a diagnostic head for "
                                                      f"`m2vla eval`")
        try:
            load_localiser(path, backbone=(config.backbone_id, config.backbone_digest))
        except CheckpointError as exc:
            raise PolicyLoadError(INVALID_CHECKPOINT, f"{path}: {exc}") from None
        return str(path.resolve())  # perception runs in another process, maybe from another directory

    # -- what the node reads ------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._policy is not None

    @property
    def config(self):
        if self._policy is None:
            raise RuntimeError("no policy loaded")
        return self._policy.config

    @property
    def contract(self):
        return self.config.contract

    @property
    def backbone_id(self) -> str:
        return self.config.backbone_id if self.loaded else ""

    @property
    def backbone_digest(self) -> str:
        return self.config.backbone_digest if self.loaded else ""

    @property
    def reads_object_positions(self) -> bool:
        """The head's state ends with the named objects' x, y, which perception's localiser reads."""
        return bool(self.localiser_dir)

    @property
    def state_joint_names(self) -> tuple[str, ...]:
        """The joints the head's state starts with, in its order (from /joint_states)."""
        from m2vla_core.sim.tasks import PRIVILEGED_STATE_NAMES

        names = tuple(self.config.state_names)
        if self.reads_object_positions:
            return names[:-len(PRIVILEGED_STATE_NAMES)]
        if names:
            return names
        if self.config.state_dim == len(DEFAULT_STATE_NAMES):
            return DEFAULT_STATE_NAMES
        raise RuntimeError(f"checkpoint {self.checkpoint} has state_dim {self.config.state_dim} but no state_names")

    @property
    def action_names(self) -> tuple[str, ...]:
        names = tuple(self.config.action_names)
        if names:
            return names
        if self.config.action_space == "joint" and self.config.action_dim == len(DEFAULT_STATE_NAMES):
            return DEFAULT_STATE_NAMES
        return tuple(f"a{i}" for i in range(self.config.action_dim))

    @property
    def action_dt_s(self) -> float:
        return float(self.config.dt_s)

    @property
    def action_space(self) -> str:
        return self.config.action_space

    @property
    def routed_pack(self) -> str:
        return str(getattr(self._policy, "routed_pack", "") or "")

    @property
    def route_confidence(self) -> float:
        return float(getattr(self._policy, "route_confidence", 0.0) or 0.0)

    # -- running ------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new episode: a pack router re-routes on the next observation."""
        with self._lock:
            self._instruction_id = None
            if self._policy is not None:
                self._policy.reset()

    def infer(self, hidden: np.ndarray, mask: np.ndarray, state: np.ndarray, instruction_id: int = 0,
              named_objects_xy: np.ndarray | None = None) -> np.ndarray | None:
        """features (L, T, D), mask (T,), joints (S,) -> chunk (H, A), or None with ``refusal_reason`` set.

        A new ``instruction_id`` starts a new episode for the policy (router state is cleared).
        ``named_objects_xy``: (4,) the named cube's and target's x, y [m] from perception's
        localiser, for a head that reads them (``reads_object_positions``); missing or
        non-finite ones are a refusal: the robot holds still rather than reach for a guess.
        Input shape / NaN errors raise ValueError: the caller counts and logs them.
        """
        with self._lock:
            policy = self._policy
            if policy is None:
                raise RuntimeError("no policy loaded")
            if instruction_id != self._instruction_id:
                policy.reset()
                self._instruction_id = instruction_id
            if self.localiser_dir:
                xy = np.asarray(named_objects_xy if named_objects_xy is not None else (), dtype=np.float32).reshape(-1)
                if xy.shape != (4,) or not np.isfinite(xy).all():
                    self.refusal_reason = (f"the head needs the named objects' x, y from perception's object "
                                           f"localiser, got {xy.tolist()}")
                    return None
                state = np.concatenate([np.asarray(state, dtype=np.float32).reshape(-1), xy])
            chunk = policy.infer(hidden, mask, state)
        if chunk is None:
            self.refusal_reason = str(getattr(policy, "refusal_reason", "") or "policy refused to act")
            return None
        chunk = np.asarray(chunk, dtype=np.float64)
        if not np.isfinite(chunk).all():
            self.refusal_reason = "policy produced non-finite actions"
            return None
        self.refusal_reason = ""
        return chunk

    def end_effector_path(self, chunk: np.ndarray) -> np.ndarray | None:
        """(H, A) joint chunk -> (H, 3) Panda grasp-point positions [m] in ``base_frame``; None if not a Panda chunk."""
        if self.action_space != "joint" or tuple(self.action_names[:7]) != ARM_JOINTS:
            return None
        if self._kinematics is None:
            from m2vla_core.kinematics import PandaKinematics

            self._kinematics = PandaKinematics()
        return self._kinematics.end_effector_positions(np.asarray(chunk)[:, :7])
