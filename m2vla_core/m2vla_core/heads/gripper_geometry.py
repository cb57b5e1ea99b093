"""Where the gripper is, computed inside the head: forward kinematics of the joint state.

A head that maps joint angles to joint targets has to learn the arm's kinematics to place the
gripper within a centimetre of a cube it is told about in table x, y. Given the gripper's
position and the vectors from it to the named objects, "move toward the cube" becomes nearly
linear in its input. Those features are a fixed function of the state the head already gets,
so the ROS messages, the ONNX graph's inputs and the feature datasets stay as they are: the
kinematic chain is read from the robot's URDF once, kept as buffers (saved with the weights),
and evaluated in torch (exported to ONNX with the rest of the head).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

PANDA_ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
PANDA_TIP_LINK = "panda_grasptarget"  # between the fingertips: the point the expert places
GRIPPER_FEATURE_SETS = ("", "panda")  # arch.gripper_features: off, or the Franka Panda of pybullet_data


@dataclass(frozen=True)
class ArmChain:
    """A serial chain of revolute joints: ``origins[i]`` is the fixed transform from the previous
    joint's frame (after its rotation) to joint i's frame, ``axes[i]`` its unit axis there, and
    ``tip`` the fixed transform from the last joint's frame to the tip link."""

    origins: np.ndarray  # (J, 4, 4)
    axes: np.ndarray  # (J, 3)
    tip: np.ndarray  # (4, 4)


def _transform(xyz: str | None, rpy: str | None) -> np.ndarray:
    x, y, z = (float(v) for v in (xyz or "0 0 0").split())
    roll, pitch, yaw = (float(v) for v in (rpy or "0 0 0").split())
    cr, sr, cp, sp, cy, sy = math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    t = np.eye(4)
    t[:3, :3] = [[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                 [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                 [-sp, cp * sr, cp * cr]]  # URDF: R = Rz(yaw) Ry(pitch) Rx(roll)
    t[:3, 3] = (x, y, z)
    return t


def chain_from_urdf(urdf_path: str | Path, joint_names: tuple[str, ...], tip_link: str) -> ArmChain:
    """The chain from the URDF's root to ``tip_link``; its movable joints must be exactly
    ``joint_names`` (revolute, in that order). Fixed joints are folded into the next transform."""
    root = ET.parse(str(urdf_path)).getroot()
    by_child = {j.find("child").get("link"): j for j in root.findall("joint")}
    path = []
    link = tip_link
    while link in by_child:
        joint = by_child[link]
        path.append(joint)
        link = joint.find("parent").get("link")
    if not path:
        raise ValueError(f"{urdf_path}: no joint leads to link {tip_link!r}")
    path.reverse()
    movable = [j for j in path if j.get("type") != "fixed"]
    if tuple(j.get("name") for j in movable) != tuple(joint_names) or any(j.get("type") != "revolute" for j in movable):
        raise ValueError(f"{urdf_path}: the chain to {tip_link!r} moves {[(j.get('name'), j.get('type')) for j in movable]}, "
                         f"expected the revolute joints {list(joint_names)}")
    origins, axes = [], []
    pending = np.eye(4)
    for joint in path:
        origin = joint.find("origin")
        t = _transform(None if origin is None else origin.get("xyz"), None if origin is None else origin.get("rpy"))
        pending = pending @ t
        if joint.get("type") == "fixed":
            continue
        axis_el = joint.find("axis")
        axis = np.array([float(v) for v in (axis_el.get("xyz") if axis_el is not None else "1 0 0").split()])
        origins.append(pending)
        axes.append(axis / np.linalg.norm(axis))
        pending = np.eye(4)
    return ArmChain(origins=np.stack(origins), axes=np.stack(axes), tip=pending)


def panda_chain() -> ArmChain:
    from m2vla_core.robot_model import panda_urdf_path

    return chain_from_urdf(panda_urdf_path(), PANDA_ARM_JOINTS, PANDA_TIP_LINK)


class ForwardKinematics(nn.Module):
    """(B, J) joint angles [rad] -> (B, 3) tip position [m] in the chain's root frame."""

    def __init__(self, chain: ArmChain) -> None:
        super().__init__()
        self.register_buffer("origins", torch.as_tensor(chain.origins, dtype=torch.float32))
        self.register_buffer("axes", torch.as_tensor(chain.axes, dtype=torch.float32))
        self.register_buffer("tip", torch.as_tensor(chain.tip, dtype=torch.float32))

    @property
    def num_joints(self) -> int:
        return int(self.axes.shape[0])

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        batch = q.shape[0]
        rot = torch.eye(3, dtype=q.dtype).expand(batch, 3, 3)
        pos = torch.zeros(batch, 3, dtype=q.dtype)
        eye = torch.eye(3, dtype=q.dtype)
        for i in range(self.num_joints):
            origin = self.origins[i]
            pos = pos + rot @ origin[:3, 3]
            rot = rot @ origin[:3, :3]
            k = self._skew(self.axes[i])  # Rodrigues: R = I + sin(q) K + (1 - cos(q)) K^2
            angle = q[:, i].reshape(batch, 1, 1)
            rot = rot @ (eye + torch.sin(angle) * k + (1.0 - torch.cos(angle)) * (k @ k))
        return pos + rot @ self.tip[:3, 3]

    @staticmethod
    def _skew(axis: torch.Tensor) -> torch.Tensor:
        x, y, z = axis[0], axis[1], axis[2]
        zero = torch.zeros_like(x)
        return torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])


def gripper_feature_names(reads_named_objects: bool) -> tuple[str, ...]:
    names = ("gripper_x", "gripper_y", "gripper_z")
    if reads_named_objects:
        names += ("cube_minus_gripper_x", "cube_minus_gripper_y", "target_minus_gripper_x", "target_minus_gripper_y")
    return names


class GripperFeatures(nn.Module):
    """Raw state (B, S) -> (B, E): the gripper's x, y, z and, for a head whose state ends with the
    named cube's and target's x, y, the vectors from the gripper to them in the table plane."""

    def __init__(self, chain: ArmChain, reads_named_objects: bool) -> None:
        super().__init__()
        self.kinematics = ForwardKinematics(chain)
        self.reads_named_objects = reads_named_objects

    @property
    def num_features(self) -> int:
        return len(gripper_feature_names(self.reads_named_objects))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        gripper = self.kinematics(state[:, : self.kinematics.num_joints])  # (B, 3)
        if not self.reads_named_objects:
            return gripper
        objects = state[:, -4:].reshape(-1, 2, 2)  # (B, cube / target, x / y)
        return torch.cat([gripper, (objects - gripper[:, None, :2]).flatten(1)], dim=-1)


def build_gripper_features(name: str, state_names: tuple[str, ...]) -> GripperFeatures | None:
    """The features ``arch.gripper_features`` (a name from ``GRIPPER_FEATURE_SETS``) names for a head
    with these state entries, or None."""
    from m2vla_core.sim.tasks import reads_privileged_state

    if not name:  # the name itself was checked by HeadArchConfig
        return None
    if tuple(state_names[: len(PANDA_ARM_JOINTS)]) != PANDA_ARM_JOINTS:
        raise ValueError(f"arch.gripper_features={name!r} computes the Panda's kinematics from the state's first "
                         f"entries, which must be {list(PANDA_ARM_JOINTS)}; this head's state is {list(state_names)}")
    return GripperFeatures(panda_chain(), reads_privileged_state(state_names))
