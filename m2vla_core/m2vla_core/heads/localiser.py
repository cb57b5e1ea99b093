"""Object localiser: where the objects an instruction names are, read once from the frozen
backbone's features of the episode's first frame.

Why it exists: a head told where the named cube and its target are transfers to unseen
layouts (100 % on reach_above, 90 % with each position 2 cm off), while a head that must find
them through the action loss alone does not (docs/results.md, "Told where the cube is"). A
probe fitted to the positions directly reads them from the same frozen features to 1.6 cm
at 448 px. So the position is learned on its own, supervised directly (and, so the fit does not
stall, with the image token each object falls on: ``training.localiser``), and handed to the head.

Two small parts, trained on first frames (arm at home) with the layout as labels:

- *where*: ``SpatialProbe`` over the image tokens of one hidden-state layer predicts every
  object's table x, y (by colour and kind, ``sim.tasks.object_keys``);
- *which*: a classifier over the instruction's tokens, in order, says which object is the
  named cube and which is its target (the cube itself when the task names none).

``named_xy`` gives (cube x, cube y, target x, target y): the order of the head's
``PRIVILEGED_STATE_NAMES``. The backbone stays frozen; only these weights are trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m2vla_core.instructions import check_names_known_colours

CONFIG_NAME = "localiser.json"
WEIGHTS_NAME = "localiser.safetensors"


@dataclass(frozen=True)
class LocaliserConfig:
    """What the localiser reads (backbone, input size, layer, tokens) and what it predicts."""

    backbone_id: str
    backbone_digest: str
    object_keys: tuple[str, ...]
    image_size: int = 448  # [px] square frames the backbone reads for the localiser
    layer: int = 0  # hidden-state layer of the image and instruction tokens
    num_image_tokens: int = 256  # the backbone's native grid at image_size
    num_text_tokens: int = 12
    width: int = 128
    hidden: int = 64
    # Reading: each object's softmax restricted to the tokens within this many rows / columns of
    # its highest-scoring token (-1: every token, as in training). A detector that scores two
    # places (two cubes, a cube and a same-coloured tray) otherwise reads their midpoint: on 768
    # held-out layouts radius 1 took the named cube's 90th-percentile error from 6.2 to 2.5 cm.
    # It assumes a detector trained to peak on the object's token (``token_weight`` > 0).
    peak_radius: int = 1
    # Neighbourhood the detector sees: 0 = each token alone (a 28 px patch at 448 px); k = also a
    # k x k convolution over the token grid, so a cube's patch and a same-coloured tray's wall or
    # zone can be told apart by what surrounds them (most wrong readings were such a mix-up).
    context: int = 0

    def __post_init__(self) -> None:
        if not self.object_keys:
            raise ValueError("LocaliserConfig.object_keys must not be empty")
        for name in ("image_size", "num_image_tokens", "num_text_tokens", "width", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LocaliserConfig.{name} must be >= 1, got {getattr(self, name)}")
        side = int(round(self.num_image_tokens ** 0.5))
        if side * side != self.num_image_tokens:
            raise ValueError(f"LocaliserConfig.num_image_tokens must be a square grid, got {self.num_image_tokens}")
        if self.layer < 0:
            raise ValueError(f"LocaliserConfig.layer must be >= 0, got {self.layer}")
        if self.peak_radius < -1:
            raise ValueError(f"LocaliserConfig.peak_radius must be >= -1, got {self.peak_radius}")
        if self.context < 0 or (self.context and self.context % 2 == 0):
            raise ValueError(f"LocaliserConfig.context must be 0 or an odd kernel size, got {self.context}")


class SpatialProbe(nn.Module):
    """Tokens (B, T, D) on a square grid -> (B, K, 2) positions of K object classes.

    A detector shared across tokens scores each class per token; a spatial softmax over the
    tokens weights their positions (learned, initialised on the grid) plus a learned per-token
    offset; an affine map takes that to table coordinates. With ``context`` = k > 0 the detector
    and the offsets also see a k x k convolution of the token grid around each token.
    """

    def __init__(self, dim: int, num_tokens: int, num_classes: int, hidden: int, context: int = 0) -> None:
        super().__init__()
        side = int(round(num_tokens ** 0.5))
        if side * side != num_tokens:
            raise ValueError(f"SpatialProbe needs a square token grid, got {num_tokens} tokens")
        self.k = num_classes
        self.context = nn.Sequential(nn.Conv2d(dim, hidden, context, padding=context // 2), nn.GELU()) \
            if context else None
        inputs = dim + (hidden if context else 0)
        self.detect = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        self.offset = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, 2 * num_classes))
        axis = torch.linspace(-1, 1, side)
        self.token_pos = nn.Parameter(torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(num_tokens, 2))
        self.to_table = nn.Linear(2, 2)
        self.side = side

    def forward(self, tokens: torch.Tensor, *, with_scores: bool = False, peak_radius: int = -1):
        """Positions (B, K, 2); with ``with_scores`` also the detector's scores (B, T, K).
        ``peak_radius`` >= 0 keeps only the tokens that close to each class's best token."""
        b, t, d = tokens.shape
        if self.context is not None:
            grid = tokens.transpose(1, 2).reshape(b, d, self.side, self.side)  # row-major tokens
            tokens = torch.cat([tokens, self.context(grid).flatten(2).transpose(1, 2)], dim=-1)
        scores = self.detect(tokens)
        weights = torch.softmax(self._near_peak(scores, peak_radius), dim=1)  # (B, T, K): where each class is
        pos = self.token_pos[None, :, None, :] + 0.1 * self.offset(tokens).view(b, t, self.k, 2)
        xy = self.to_table((weights[..., None] * pos).sum(1))  # (B, K, 2)
        return (xy, scores) if with_scores else xy

    def _near_peak(self, scores: torch.Tensor, radius: int) -> torch.Tensor:
        if radius < 0:
            return scores
        grid = torch.arange(scores.shape[1], device=scores.device)
        rows, cols = grid // self.side, grid % self.side  # (T,)
        peak = scores.argmax(dim=1)  # (B, K)
        near = (((rows[None, :, None] - (peak // self.side)[:, None, :]).abs() <= radius)
                & ((cols[None, :, None] - (peak % self.side)[:, None, :]).abs() <= radius))  # (B, T, K)
        return scores.masked_fill(~near, float("-inf"))


class ObjectLocaliser(nn.Module):
    """(image tokens, instruction tokens) -> every object's x, y and which two are named."""

    def __init__(self, config: LocaliserConfig) -> None:
        super().__init__()
        self.config = config
        k, d = len(config.object_keys), config.width
        self.where = SpatialProbe(d, config.num_image_tokens, k, config.hidden, config.context)
        self.which = nn.Sequential(nn.Linear(config.num_text_tokens * d, config.hidden), nn.GELU())
        self.cube_logits = nn.Linear(config.hidden, k)
        self.target_logits = nn.Linear(config.hidden, k + 1)  # the last class: the cube itself
        # Standardisation of the frozen features, from the training split (set_feature_stats).
        self.register_buffer("image_mean", torch.zeros(d))
        self.register_buffer("image_std", torch.ones(d))
        self.register_buffer("text_mean", torch.zeros(d))
        self.register_buffer("text_std", torch.ones(d))

    def set_feature_stats(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> None:
        """Per-dimension mean and std of (N, T, D) image and instruction tokens."""
        self.image_mean.copy_(image_tokens.float().mean((0, 1)))
        self.image_std.copy_(image_tokens.float().std((0, 1)) + 1e-6)
        self.text_mean.copy_(text_tokens.float().mean((0, 1)))
        self.text_std.copy_(text_tokens.float().std((0, 1)) + 1e-6)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, *, with_scores: bool = False,
                peak_radius: int = -1):
        """(B, T_img, D), (B, T_txt, D) -> objects_xy (B, K, 2), cube logits (B, K), target logits
        (B, K + 1), and with ``with_scores`` the detector's per-token scores (B, T_img, K)."""
        img = (image_tokens.float() - self.image_mean) / self.image_std
        txt = (text_tokens.float() - self.text_mean) / self.text_std
        latent = self.which(txt.flatten(1))
        where = self.where(img, with_scores=with_scores, peak_radius=peak_radius)
        if with_scores:
            return where[0], self.cube_logits(latent), self.target_logits(latent), where[1]
        return where, self.cube_logits(latent), self.target_logits(latent)

    @torch.no_grad()
    def named_xy(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 4) x, y of the named cube, then of its target (the cube's own when none)."""
        objects, cube_logits, target_logits = self(image_tokens, text_tokens, peak_radius=self.config.peak_radius)
        return pick_named(objects, cube_logits.argmax(-1), target_logits.argmax(-1))


def pick_named(objects_xy: torch.Tensor, cube: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 4) cube x, y + target x, y out of (B, K, 2) positions by index; target K = the cube itself."""
    rows = torch.arange(len(objects_xy), device=objects_xy.device)
    target = torch.where(target == objects_xy.shape[1], cube, target)
    return torch.cat([objects_xy[rows, cube], objects_xy[rows, target]], dim=-1)


def save_localiser(localiser: ObjectLocaliser, directory: str | os.PathLike) -> Path:
    """Write localiser.json + localiser.safetensors into ``directory`` (e.g. beside a head's files)."""
    from m2vla_core.config_io import save_json
    from m2vla_core.heads.checkpoint import atomic_save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(localiser.state_dict(), directory / WEIGHTS_NAME, {"format": "m2vla-localiser", "version": "1"})
    save_json(localiser.config, directory / CONFIG_NAME)
    return directory


def has_localiser(directory: str | os.PathLike) -> bool:
    """Either file counts, so half a localiser (an interrupted copy) fails loudly in
    ``load_localiser`` instead of leaving a head to read simulator truth."""
    return any((Path(directory) / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME))


def load_localiser(directory: str | os.PathLike, *, backbone: tuple[str, str] | None = None) -> ObjectLocaliser:
    """Load safely (strict JSON, safetensors only, keys and shapes checked); ``backbone=(id,
    weights_digest)`` refuses a localiser fitted on another backbone."""
    from m2vla_core.heads.checkpoint import (
        CheckpointError, check_state_matches, load_config_file, read_weights, refuse_pickles,
    )

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: localiser directory not found")
    refuse_pickles(directory)
    config = load_config_file(LocaliserConfig, directory / CONFIG_NAME, f"{directory}: no {CONFIG_NAME}; not a localiser")
    if backbone is not None and (config.backbone_id, config.backbone_digest) != tuple(backbone):
        raise CheckpointError(f"{directory}: localiser was fitted on backbone {config.backbone_id!r} "
                              f"(weights {config.backbone_digest[:12]}), refusing it on {backbone[0]!r} "
                              f"(weights {backbone[1][:12]})")
    weights, state = read_weights(directory, WEIGHTS_NAME)
    localiser = ObjectLocaliser(config)
    check_state_matches(state, localiser.state_dict(), weights, CONFIG_NAME)
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise CheckpointError(f"{weights}: non-finite weights")
    if not (bool((state["image_std"] > 0).all()) and bool((state["text_std"] > 0).all())):
        raise CheckpointError(f"{weights}: feature std must be positive")
    localiser.load_state_dict(state)
    return localiser.eval()


class NamedObjectReader:
    """A localiser beside the backbone it reads: one camera frame + instruction -> the named
    objects' (cube x, cube y, target x, target y) [m].

    The one way both ``m2vla eval`` (``VLAAgent``) and the perception node run a localiser. It
    reads its own input size (``LocaliserConfig.image_size``) through a resized view of the
    head's backbone (shared weights) and stops at its one layer, so a reading costs a shallow
    pass, done once per instruction.
    """

    def __init__(self, localiser: ObjectLocaliser, backbone) -> None:
        cfg = localiser.config
        if (cfg.backbone_id, cfg.backbone_digest) != (backbone.backbone_id, backbone.weights_digest):
            raise ValueError(f"the localiser was fitted on backbone {cfg.backbone_id!r} (weights "
                             f"{cfg.backbone_digest[:12]}), this backbone is {backbone.backbone_id!r} "
                             f"(weights {backbone.weights_digest[:12]})")
        self.localiser = localiser
        self.backbone = backbone.at_image_size(cfg.image_size)
        self.contract = self.backbone.contract([cfg.layer], num_text_tokens=cfg.num_text_tokens)
        if self.contract.num_image_tokens != cfg.num_image_tokens:
            raise ValueError(f"the localiser reads {cfg.num_image_tokens} image tokens, the backbone gives "
                             f"{self.contract.num_image_tokens} at {cfg.image_size} px")

    @property
    def image_size(self) -> int:
        return int(self.localiser.config.image_size)

    @property
    def colours(self) -> frozenset[str]:
        """The colours its objects are named by (``object_keys`` are colour_kind)."""
        return frozenset(key.split("_")[0] for key in self.localiser.config.object_keys)

    def read(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """(4,) float32 x, y of the named cube and of its target; ValueError (InstructionError)
        when the instruction names none of its objects' colours or another colour, and when the
        positions are non-finite (a robot must not act on them)."""
        check_names_known_colours(instruction, self.colours)
        bundle = self.backbone.extract(image, instruction, self.contract)
        hidden = bundle.hidden[0].float().cpu()[None]  # (1, T, D)
        n_img = self.contract.num_image_tokens
        xy = self.localiser.named_xy(hidden[:, :n_img], hidden[:, n_img:])[0].numpy().astype(np.float32)
        if not np.isfinite(xy).all():
            raise ValueError(f"the object localiser read non-finite positions {xy.tolist()}; refusing to act on them")
        return xy
