"""Forward kinematics of the Panda from its URDF, in a private PyBullet client.

Used to draw the predicted end-effector path of a joint-space chunk and to check a workspace
box. A private DIRECT client keeps it independent of any simulation running in the process.
"""

from __future__ import annotations

import numpy as np

from m2vla_core.robot_model import panda_urdf_path

ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
END_EFFECTOR_LINK = "panda_grasptarget"  # between the fingertips; falls back to panda_hand


class PandaKinematics:
    def __init__(self) -> None:
        import pybullet as p

        self._p = p
        self._client = p.connect(p.DIRECT)
        self._robot = p.loadURDF(str(panda_urdf_path()), useFixedBase=True, physicsClientId=self._client)
        names = {}
        links = {}
        for j in range(p.getNumJoints(self._robot, physicsClientId=self._client)):
            info = p.getJointInfo(self._robot, j, physicsClientId=self._client)
            names[info[1].decode()] = j
            links[info[12].decode()] = j
        self._arm = [names[n] for n in ARM_JOINTS]
        self._ee = links.get(END_EFFECTOR_LINK, links.get("panda_hand"))

    def end_effector_positions(self, arm_q: np.ndarray) -> np.ndarray:
        """(N, 7) arm joint positions [rad] -> (N, 3) end-effector positions [m] in panda_link0."""
        arm_q = np.atleast_2d(np.asarray(arm_q, dtype=np.float64))  # (N, 7)
        if arm_q.shape[1] < 7 or not np.isfinite(arm_q).all():
            raise ValueError(f"expected finite (N, >=7) joint positions, got shape {arm_q.shape}")
        out = np.empty((arm_q.shape[0], 3))
        for i, q in enumerate(arm_q):
            for joint, value in zip(self._arm, q[:7]):
                self._p.resetJointState(self._robot, joint, float(value), physicsClientId=self._client)
            state = self._p.getLinkState(self._robot, self._ee, computeForwardKinematics=True,
                                         physicsClientId=self._client)
            out[i] = state[4]  # world position of the link frame; the base sits at the origin
        return out

    def close(self) -> None:
        if self._client is not None:
            self._p.disconnect(self._client)
            self._client = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
