"""The language-conditioned task suite: one scene kind, the instruction decides what to do.

Every episode shows three coloured cubes (of red / green / blue / yellow), two flat coloured
zones and one coloured tray at random poses. A task picks which cube and which target the
instruction names, writes the instruction from one of several phrasings (chosen by the seed),
and judges success from the simulator's state only. Success checks are strict on purpose: a
cube 1 cm outside its zone, or a cube still held above the tray, is a failure.

Lookup is strict (``get_task`` raises with a did-you-mean), like the other presets.
"""

from __future__ import annotations

import difflib
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from m2vla_core.sim.scene import (
    COLOURS_RGBA, CUBE_SIZE_M, TRAY_SIZE_M, TRAY_WALL_THICKNESS_M, ZONE_SIZE_M, CubeSpec, Layout, TargetSpec,
)

if TYPE_CHECKING:
    from m2vla_core.sim.env import EpisodeTracker
    from m2vla_core.sim.scene import Scene

COLOURS = tuple(COLOURS_RGBA)
WORKSPACE_X_M = (0.38, 0.68)
WORKSPACE_Y_M = (-0.26, 0.26)
N_CUBES = 3
N_ZONES = 2

# Success tolerances (strict; tests place objects just outside them).
ZONE_INSIDE_M = ZONE_SIZE_M / 2 - 0.01  # cube centre within this of the zone centre, per axis
TRAY_INSIDE_M = TRAY_SIZE_M / 2 - TRAY_WALL_THICKNESS_M - CUBE_SIZE_M / 2 + 0.004
ON_TABLE_MAX_Z_M = CUBE_SIZE_M / 2 + 0.008  # cube centre height when resting on the table
IN_TRAY_MAX_Z_M = 0.05  # resting on the tray floor, not hovering above it
LIFTED_MIN_Z_M = 0.10  # pick-and-lift: cube centre at least this high ...
CARRIED_MIN_Z_M = 0.06  # place tasks: the cube must have been carried this high at some point
PUSH_MAX_Z_M = CUBE_SIZE_M / 2 + 0.015  # push: never lifted above this
STACK_XY_M = 0.02
STACK_DZ_M = (CUBE_SIZE_M - 0.005, CUBE_SIZE_M + 0.006)
REACH_XY_M = 0.02
REACH_DZ_M = (0.03, 0.10)  # grasp point above the cube centre


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything that defines an episode before physics runs."""

    task: str
    seed: int
    instruction: str
    layout: Layout
    cube: str  # colour of the cube the instruction is about
    target_kind: str  # "cube" (stack), "zone", "tray", or "" (reach, lift)
    target: str  # colour of that target, "" when none

    def named_objects_xy(self) -> np.ndarray:
        """(4,) [m] table x, y of the named cube, then of its target (the cube's own when none).

        Where the layout put them at the start of the episode (a moved cube is not followed): the
        recorded demonstrations keep no object poses, and this is what training can recompute from
        the seed. Simulator truth that a camera-only policy must read from pixels: see
        ``PRIVILEGED_STATE_NAMES``.
        """
        cube = self.layout.cube(self.cube).xy_m
        if self.target_kind == "cube":
            target = self.layout.cube(self.target).xy_m
        elif self.target_kind:
            target = self.layout.target(self.target_kind, self.target).xy_m
        else:
            target = cube
        return np.array([*cube, *target], dtype=np.float64)

    def named_object_keys(self) -> tuple[str, str]:
        """Keys (``object_keys``) of the named cube and of its target (the cube's own when none)."""
        cube = f"{self.cube}_cube"
        return cube, (f"{self.target}_{self.target_kind}" if self.target_kind else cube)

    def objects_xy(self) -> np.ndarray:
        """(2 * len(object_keys()),) [m] table x, y of every object by ``object_keys``; NaN where the
        layout has no such object. Training targets (``m2vla features --object-targets``)."""
        xy = np.full((len(object_keys()), 2), np.nan)
        keys = object_keys()
        for cube in self.layout.cubes:
            xy[keys.index(f"{cube.colour}_cube")] = cube.xy_m
        for target in self.layout.targets:
            xy[keys.index(f"{target.colour}_{target.kind}")] = target.xy_m
        return xy.reshape(-1)


TARGET_KINDS = ("zone", "tray")


def object_keys() -> tuple[str, ...]:
    """Every object a layout may hold, by colour and kind: "red_cube", ..., "red_zone", ..., "red_tray", ..."""
    return tuple(f"{colour}_{kind}" for kind in ("cube", *TARGET_KINDS) for colour in COLOURS)


# ``EpisodeSpec.objects_xy`` entry names: what a head trained with ``m2vla features
# --object-targets`` learns to predict (every object, not only the named ones: four times the
# labels per frame, and no need to read the instruction to place them). It never reads them.
OBJECT_XY_NAMES = tuple(f"{key}_{axis}" for key in object_keys() for axis in "xy")
# The entries of ``EpisodeSpec.named_objects_xy``.
NAMED_OBJECT_XY_NAMES = ("cube_x", "cube_y", "target_x", "target_y")
# State entries a diagnostic head may read on top of the joints: the named objects' positions
# from the simulator (``EpisodeSpec.named_objects_xy``). A head trained with them shows what the
# policy could do if perception located the objects perfectly. No robot has them: the ROS policy
# node loads such a head only with an object localiser beside it (``m2vla localiser``), whose
# reading of the camera perception sends in their place.
PRIVILEGED_STATE_NAMES = tuple(f"privileged_{name}" for name in NAMED_OBJECT_XY_NAMES)


def reads_privileged_state(state_names) -> bool:
    """Whether a head's state ends with ``PRIVILEGED_STATE_NAMES``; refuses them anywhere else."""
    names = tuple(state_names)
    if not any(n in PRIVILEGED_STATE_NAMES for n in names):
        return False
    if names[-len(PRIVILEGED_STATE_NAMES):] != PRIVILEGED_STATE_NAMES:
        raise ValueError(f"state names {names}: privileged entries must be the last {len(PRIVILEGED_STATE_NAMES)}, "
                         f"in the order {PRIVILEGED_STATE_NAMES}")
    return True


def _dist(a, b) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


def _seg_dist(p, a, b) -> float:
    """Distance in the plane from point p to segment ab."""
    p, a, b = (np.asarray(v, dtype=float)[:2] for v in (p, a, b))
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def sample_layout(rng: np.random.Generator) -> Layout:
    """Random non-overlapping poses of 3 cubes, 2 zones and 1 tray in the reachable workspace."""
    for _ in range(1000):
        cube_colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:N_CUBES]]
        target_colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[: N_ZONES + 1]]
        placed: list[tuple[str, np.ndarray]] = []
        margin = TRAY_SIZE_M / 2 + 0.01
        tray_xy = np.array([rng.uniform(WORKSPACE_X_M[0] + 0.04, WORKSPACE_X_M[1] - 0.04),
                            rng.uniform(WORKSPACE_Y_M[0] + margin - 0.06, WORKSPACE_Y_M[1] - margin + 0.06)])
        placed.append(("tray", tray_xy))
        min_sep = {("tray", "zone"): 0.16, ("zone", "zone"): 0.13, ("tray", "cube"): 0.14,
                   ("zone", "cube"): 0.10, ("cube", "cube"): 0.08}
        ok = True
        for kind in ["zone"] * N_ZONES + ["cube"] * N_CUBES:
            for _ in range(200):
                xy = np.array([rng.uniform(*WORKSPACE_X_M), rng.uniform(*WORKSPACE_Y_M)])
                if all(_dist(xy, other) >= min_sep.get((k, kind), min_sep.get((kind, k), 0.0)) for k, other in placed):
                    placed.append((kind, xy))
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        zones = [xy for k, xy in placed if k == "zone"]
        cubes_xy = [xy for k, xy in placed if k == "cube"]
        yaws = rng.uniform(-np.pi / 4, np.pi / 4, size=N_CUBES)
        cubes = tuple(CubeSpec(c, (float(xy[0]), float(xy[1])), float(yaw))
                      for c, xy, yaw in zip(cube_colours, cubes_xy, yaws))
        targets = tuple(TargetSpec("zone", c, (float(xy[0]), float(xy[1])))
                        for c, xy in zip(target_colours[:N_ZONES], zones))
        targets += (TargetSpec("tray", target_colours[N_ZONES], (float(tray_xy[0]), float(tray_xy[1]))),)
        return Layout(cubes=cubes, targets=targets)
    raise RuntimeError("could not sample a layout in 1000 tries (workspace too small for the objects)")


class Task:
    """Base class: subclasses set name/templates and implement ``choose`` and ``success``."""

    name: str = ""
    description: str = ""
    templates: tuple[str, ...] = ()
    target_kind: str = ""

    def make_episode(self, seed: int) -> EpisodeSpec:
        """Deterministic in (task name, seed); different tasks get different layouts for a seed."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(self.name.encode())]))
        for _ in range(200):
            layout = sample_layout(rng)
            cube = layout.cubes[int(rng.integers(len(layout.cubes)))].colour
            target = self.choose_target(layout, cube, rng)
            if target is not None and self.feasible(layout, cube, target):
                template = self.templates[int(rng.integers(len(self.templates)))]
                kind_word = {"zone": "zone", "tray": "tray", "cube": "base"}.get(self.target_kind, "")
                text = template.format(cube=cube, **({kind_word: target} if kind_word else {}))
                return EpisodeSpec(task=self.name, seed=int(seed), instruction=text, layout=layout, cube=cube,
                                   target_kind=self.target_kind, target=target)
        raise RuntimeError(f"task {self.name!r}: no feasible layout for seed {seed} in 200 tries")

    def choose_target(self, layout: Layout, cube: str, rng: np.random.Generator) -> str | None:
        if self.target_kind == "":
            return ""
        if self.target_kind == "cube":
            options = [c.colour for c in layout.cubes if c.colour != cube]
        else:
            options = [t.colour for t in layout.targets if t.kind == self.target_kind]
        return options[int(rng.integers(len(options)))]

    def feasible(self, layout: Layout, cube: str, target: str) -> bool:
        return True

    def success(self, scene: "Scene", spec: EpisodeSpec, tracker: "EpisodeTracker") -> bool:
        raise NotImplementedError


def _in_square(xy, centre, half: float) -> bool:
    return abs(xy[0] - centre[0]) <= half and abs(xy[1] - centre[1]) <= half


class ReachAbove(Task):
    name = "reach_above"
    description = "move the gripper above a cube without touching it"
    templates = ("move the gripper above the {cube} cube", "reach over the {cube} cube",
                 "hover above the {cube} block", "go to the top of the {cube} cube")

    def success(self, scene, spec, tracker) -> bool:
        pos, _ = scene.cube_pose(spec.cube)
        ee = scene.ee_pose()[:3]
        dz = ee[2] - pos[2]
        return (_dist(ee, pos) <= REACH_XY_M and REACH_DZ_M[0] <= dz <= REACH_DZ_M[1]
                and not scene.robot_contact(spec.cube) and pos[2] <= ON_TABLE_MAX_Z_M)


class PushToZone(Task):
    name = "push_to_zone"
    description = "push a cube along the table into a zone, without lifting it"
    target_kind = "zone"
    templates = ("push the {cube} cube onto the {zone} zone", "slide the {cube} block into the {zone} zone",
                 "push the {cube} block to the {zone} square", "shove the {cube} cube into the {zone} area")

    def feasible(self, layout, cube, target) -> bool:
        """Short, clear push: zone 10-22 cm away, nothing on the line or behind the cube."""
        c = np.array(layout.cube(cube).xy_m)
        z = np.array(layout.target("zone", target).xy_m)
        d = float(np.linalg.norm(z - c))
        if not 0.10 <= d <= 0.22:
            return False
        start = c - (z - c) / d * 0.08  # where the fingers go down
        if not (0.33 <= start[0] <= 0.74 and abs(start[1]) <= 0.30):
            return False
        for other in layout.cubes:
            if other.colour != cube and _seg_dist(other.xy_m, start, z) < 0.075:
                return False
        tray = layout.targets[-1]
        return _seg_dist(tray.xy_m, start, z) >= TRAY_SIZE_M / 2 * 1.42 + 0.04

    def success(self, scene, spec, tracker) -> bool:
        pos, _ = scene.cube_pose(spec.cube)
        zone = spec.layout.target("zone", spec.target).xy_m
        return (_in_square(pos, zone, ZONE_INSIDE_M) and pos[2] <= ON_TABLE_MAX_Z_M
                and tracker.max_z[spec.cube] <= PUSH_MAX_Z_M)


class PickLift(Task):
    name = "pick_lift"
    description = "grasp a cube and hold it up"
    templates = ("pick up the {cube} cube", "lift the {cube} block", "grab the {cube} cube and lift it",
                 "raise the {cube} cube off the table")

    def success(self, scene, spec, tracker) -> bool:
        pos, _ = scene.cube_pose(spec.cube)
        return pos[2] >= LIFTED_MIN_Z_M and scene.finger_contact(spec.cube)


class PlaceOnZone(Task):
    name = "place_on_zone"
    description = "carry a cube onto a zone and let go"
    target_kind = "zone"
    templates = ("pick up the {cube} cube and place it on the {zone} zone", "put the {cube} block on the {zone} zone",
                 "place the {cube} cube onto the {zone} square", "carry the {cube} cube to the {zone} zone")

    def success(self, scene, spec, tracker) -> bool:
        pos, _ = scene.cube_pose(spec.cube)
        zone = spec.layout.target("zone", spec.target).xy_m
        return (_in_square(pos, zone, ZONE_INSIDE_M) and pos[2] <= ON_TABLE_MAX_Z_M
                and tracker.max_z[spec.cube] >= CARRIED_MIN_Z_M and not scene.robot_contact(spec.cube))


class Stack(Task):
    name = "stack"
    description = "put one cube on top of another and let go"
    target_kind = "cube"
    templates = ("stack the {cube} cube on the {base} cube", "put the {cube} block on top of the {base} block",
                 "place the {cube} cube onto the {base} cube", "stack the {cube} block on the {base} one")

    def success(self, scene, spec, tracker) -> bool:
        top, _ = scene.cube_pose(spec.cube)
        base, _ = scene.cube_pose(spec.target)
        dz = top[2] - base[2]
        return (_dist(top, base) <= STACK_XY_M and STACK_DZ_M[0] <= dz <= STACK_DZ_M[1]
                and base[2] <= ON_TABLE_MAX_Z_M and not scene.robot_contact(spec.cube))


class PutInTray(Task):
    name = "put_in_tray"
    description = "drop a cube into the tray"
    target_kind = "tray"
    templates = ("put the {cube} cube in the {tray} tray", "pick up the {cube} cube and place it in the {tray} tray",
                 "drop the {cube} block into the {tray} tray", "move the {cube} cube into the {tray} tray")

    def success(self, scene, spec, tracker) -> bool:
        pos, _ = scene.cube_pose(spec.cube)
        tray = spec.layout.target("tray", spec.target).xy_m
        return (_in_square(pos, tray, TRAY_INSIDE_M) and pos[2] <= IN_TRAY_MAX_Z_M
                and not scene.robot_contact(spec.cube))


TASKS: dict[str, Task] = {t.name: t for t in (ReachAbove(), PushToZone(), PickLift(), PlaceOnZone(), Stack(), PutInTray())}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    """Strict lookup by name; an unknown name raises KeyError with the closest match."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown task {name!r}{hint}; known: {', '.join(TASKS)}") from None


def parse_task_list(text: str) -> list[str]:
    """'all' or 'a,b' -> validated task names (each looked up strictly, each at most once: a
    repeated task would run the same seeds twice)."""
    if text.strip() == "all":
        return task_names()
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("empty task list")
    tasks = [get_task(n).name for n in names]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ValueError(f"task list {text!r} names {', '.join(repeated)} more than once")
    return tasks
