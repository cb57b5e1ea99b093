"""Train a head on a feature dataset: normalisation on the train split, skill memory from the
train split, AdamW with warmup + cosine, periodic validation, safetensors checkpoints and an
exact resume.

Determinism: weights are initialised from ``seed`` and every step draws its batch from a
generator seeded by (seed, step), so a run resumed at step k continues exactly as the
uninterrupted run would (the optimizer state is saved too, in safetensors).

Output directory: config.json + model.safetensors (the head, loadable by ``load_head``),
train_state.safetensors (optimizer moments + step), train.json (run config + history),
loss_curves.png.

With ``arch.aux_weight > 0`` the loss adds that weight times the MSE of the auxiliary
prediction (normalised targets, e.g. every object's x, y; absent ones, NaN, are left out).
``history["train"]`` and ``history["val"]`` stay the action loss alone, so runs with and
without it compare; ``history["val_aux_rmse"]`` is the validation error of the prediction in
the targets' units. The same holds for ``train.grasp_point_weight`` (a loss on where the
waypoints put the gripper); ``history["val_grasp_point_cm"]`` reports that error for every head
with the gripper's kinematics, whether it was trained on it or not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from m2vla_core.config_io import atomic_write_text, from_dict, to_dict
from m2vla_core.heads.checkpoint import (CheckpointError, atomic_save_safetensors, check_safetensors_file, load_head,
                                         save_head)
from m2vla_core.heads.configuration_head import HeadArchConfig
from m2vla_core.heads.factory import DEFAULT_PRESET, get_preset
from m2vla_core.heads.policy_head import PolicyHead
from m2vla_core.training.feature_dataset import AUX_FIELD, DatasetError, FeatureDataset
from m2vla_core.training.normalization import dataset_stats

log = logging.getLogger(__name__)

TRAIN_STATE_NAME = "train_state.safetensors"
RUN_NAME = "train.json"
PLOT_NAME = "loss_curves.png"
ACTION_LOSSES = ("mse", "l1")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    val_fraction: float = 0.1  # of episodes
    val_every: int = 200
    val_max_samples: int = 2048
    ckpt_every: int = 500
    seed: int = 0
    # Auxiliary loss (arch.aux_weight > 0) only on each episode's first N frames, from a batch of
    # its own; 0 = every frame. Later frames of a demonstration show the arm closing in on the
    # cube, and a predictor that reads the arm instead of the cube fails in closed loop.
    aux_first_frames: int = 0
    # [m] std (per axis) of Gaussian noise added to the named objects' x, y in the state of each
    # training sample (a head trained with ``--privileged-state``): a head that will read them from
    # an object localiser learns to tolerate its centimetre errors instead of trusting the
    # simulator's exact values. One draw per point; a target that is the cube itself moves with it.
    position_noise_m: float = 0.0
    # The action loss in normalised units: "mse", or "l1" (the median of what the demonstrations do
    # in a state rather than their mean: less pulled between two ways of solving it). Validation
    # reports the MSE either way, so runs compare.
    action_loss: str = "mse"
    # Weight of a grasp-point loss added to the action loss: the mean per-axis distance [cm] between
    # where the predicted and the demonstrated waypoints put the gripper (forward kinematics, needs
    # ``arch.gripper_features``). A joint-space loss weighs every joint alike, while a shoulder error
    # moves the fingertips far more than a wrist error of the same size; grasps and placements are
    # judged in centimetres. 0 = off (on the shipped recipe, 0.3 did not help: docs/results.md).
    grasp_point_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.action_loss not in ACTION_LOSSES:
            raise ValueError(f"TrainConfig.action_loss must be one of {ACTION_LOSSES}, got {self.action_loss!r}")
        for name in ("steps", "batch_size", "val_every", "ckpt_every", "val_max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.aux_first_frames < 0:
            raise ValueError(f"TrainConfig.aux_first_frames must be >= 0 (0 = every frame), got {self.aux_first_frames}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(f"TrainConfig weight_decay must be >= 0 and grad_clip > 0, got {self.weight_decay}/{self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not (math.isfinite(self.position_noise_m) and self.position_noise_m >= 0):
            raise ValueError(f"TrainConfig.position_noise_m must be finite and >= 0, got {self.position_noise_m}")
        if not (math.isfinite(self.grasp_point_weight) and self.grasp_point_weight >= 0):
            raise ValueError(f"TrainConfig.grasp_point_weight must be finite and >= 0, got {self.grasp_point_weight}")


@dataclass
class RunConfig:
    """What a JSON ``--config`` file holds: architecture + training settings."""

    arch: HeadArchConfig = field(default_factory=HeadArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""  # informational: the preset this run started from

    def __post_init__(self) -> None:
        if self.train.aux_first_frames and not self.arch.aux_weight:
            raise ValueError(f"TrainConfig.aux_first_frames = {self.train.aux_first_frames} needs an auxiliary loss "
                             f"(arch.aux_weight > 0, `--aux-weight`); without one it would be silently ignored")
        if self.train.grasp_point_weight and not self.arch.gripper_features:
            raise ValueError(f"TrainConfig.grasp_point_weight = {self.train.grasp_point_weight} needs the gripper's "
                             f"kinematics (arch.gripper_features, `--gripper-features panda`)")


def read_run_record(out_dir: str | os.PathLike, *, history: bool = True) -> dict:
    """A checkpoint directory's train.json, checked to hold the run config and (``history``) the
    loss history a resume continues; CheckpointError naming the file and what is missing."""
    path = Path(out_dir) / RUN_NAME
    if not path.is_file():
        raise CheckpointError(f"{out_dir}: nothing to resume ({RUN_NAME} missing)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
        raise CheckpointError(f"{path}: no \"run\" object (the run config); not a train.json of `m2vla train`")
    saved = record.get("history")
    if history and not (isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("train", "val"))):
        raise CheckpointError(f"{path}: no \"history\" with \"train\" and \"val\" lists; cannot resume this run")
    return record


def saved_run_config(out_dir: str | os.PathLike) -> RunConfig:
    """The RunConfig a checkpoint directory was trained with (for ``--resume`` without ``--config``)."""
    record = read_run_record(out_dir, history=False)
    try:
        return from_dict(RunConfig, record["run"])
    except ValueError as exc:  # ConfigError is one
        raise CheckpointError(f"{Path(out_dir) / RUN_NAME}: {exc}") from exc


def run_config_from_preset(name: str = DEFAULT_PRESET) -> RunConfig:
    return RunConfig(arch=get_preset(name), preset=name)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    train_loss: list[tuple[int, float]]
    val_loss: list[tuple[int, float]]
    seconds: float
    val_aux_rmse: list[tuple[int, float]] = field(default_factory=list)  # [target units] with arch.aux_weight > 0
    val_grasp_point_cm: list[tuple[int, float]] = field(default_factory=list)  # with the gripper's kinematics


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _step_generator(cfg: TrainConfig, step: int, stream: int) -> torch.Generator:
    """The draws of one step and purpose (``stream``) depend on the seed and step only, so a
    resumed run repeats them."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + stream * 7_919_000_017)


def _batch_indices(train_idx: np.ndarray, step: int, cfg: TrainConfig, stream: int = 0) -> np.ndarray:
    gen = _step_generator(cfg, step, stream)
    picks = torch.randint(len(train_idx), (cfg.batch_size,), generator=gen).numpy()
    return train_idx[picks]


def perturb_positions(state: torch.Tensor, std_m: float, step: int, cfg: TrainConfig) -> torch.Tensor:
    """(B, S) state whose last 4 entries are cube x, y, target x, y -> a copy with each point moved
    by N(0, std_m^2) per axis (``_step_generator``: a resumed run repeats the draw); where the
    target is the cube itself (reach, lift) both move together."""
    noise = torch.randn(len(state), 2, 2, generator=_step_generator(cfg, step, stream=3)) * std_m  # (B, point, xy)
    xy = state[:, -4:].reshape(-1, 2, 2)
    same = (xy[:, 0] == xy[:, 1]).all(-1)  # (B,)
    noise[same, 1] = noise[same, 0]
    out = state.clone()
    out[:, -4:] = (xy + noise.to(state.dtype)).reshape(-1, 4)
    return out


@dataclass
class Losses:
    """One batch's losses: the action loss in normalised units, the auxiliary MSE (None without
    auxiliary targets) and the grasp-point error in cm (None without the gripper's kinematics)."""

    action: torch.Tensor
    aux: torch.Tensor | None = None
    grasp_point_cm: torch.Tensor | None = None


def grasp_point_error_cm(head: PolicyHead, pred_n: torch.Tensor, actions: torch.Tensor,
                         state: torch.Tensor) -> torch.Tensor:
    """Mean per-axis distance [cm] between the gripper positions of the predicted waypoints
    (normalised, before the action range's clamp, so it keeps its gradient) and of the
    demonstrated ones (B, H, A), by the head's forward kinematics."""
    kinematics = head.gripper_features.kinematics
    joints = kinematics.num_joints
    pred = head.unbounded_action(pred_n, state)  # (B, H, A)
    predicted, demonstrated = (kinematics(chunk[..., :joints].reshape(-1, joints)) for chunk in (pred, actions))
    return (predicted - demonstrated).abs().mean() * 100.0


def _losses(head: PolicyHead, batch: dict[str, torch.Tensor], exclude: bool,
            action_loss: str = "mse", grasp_point: bool = True) -> Losses:
    """This batch's ``Losses``; the action loss an MSE or an L1 in normalised units; the grasp-point
    error only when asked for (forward kinematics of every waypoint, twice)."""
    target = head.normalized_action_target(batch["actions"], batch["state"])  # (B, H, A)
    exclude_ep = batch["episode_index"] if exclude and head.uses_memory else None
    pred, aux = head.forward_training(batch["hidden"], batch["mask"], batch["state"], exclude_episode=exclude_ep)
    losses = Losses((torch.nn.functional.l1_loss if action_loss == "l1" else torch.nn.functional.mse_loss)(pred, target))
    if grasp_point and head.gripper_features is not None:
        losses.grasp_point_cm = grasp_point_error_cm(head, pred, batch["actions"], batch["state"])
    if aux is None:
        return losses
    target = head.aux_predictor.normalize(batch[AUX_FIELD])  # (B, K), NaN where absent
    present = ~torch.isnan(target)
    losses.aux = ((aux - torch.nan_to_num(target))[present].pow(2).mean() if present.any()
                  else aux.sum() * 0.0)  # nothing to learn from in this batch
    return losses


@torch.no_grad()
def validation_means(head: PolicyHead, dataset: FeatureDataset, val_idx: np.ndarray,
                     batch_size: int = 256) -> dict[str, float]:
    """Means over (up to the first ``len(val_idx)``) validation samples: the normalised action MSE
    ("action") and, for a head with the gripper's kinematics, the grasp-point error in cm
    ("grasp_point_cm")."""
    was_training = head.training
    head.eval()
    totals: dict[str, float] = {}
    count = 0
    for start in range(0, len(val_idx), batch_size):
        idx = val_idx[start:start + batch_size]
        losses = _losses(head, dataset.batch(idx), exclude=False)
        for name, value in (("action", losses.action), ("grasp_point_cm", losses.grasp_point_cm)):
            if value is not None:
                totals[name] = totals.get(name, 0.0) + float(value) * len(idx)
        count += len(idx)
    head.train(was_training)
    return {name: total / max(count, 1) for name, total in totals.items()} if count else {"action": 0.0}


def validation_loss(head: PolicyHead, dataset: FeatureDataset, val_idx: np.ndarray, batch_size: int = 256) -> float:
    """Mean normalised action MSE over (up to the first ``len(val_idx)``) validation samples."""
    return validation_means(head, dataset, val_idx, batch_size)["action"]


@torch.no_grad()
def aux_rmse(head: PolicyHead, dataset: FeatureDataset, idx: np.ndarray, batch_size: int = 256) -> float:
    """RMS error of the auxiliary prediction over samples ``idx`` (present targets), in their units (e.g. m);
    NaN when no target is present there."""
    was_training = head.training
    head.eval()
    squared, count = 0.0, 0
    for start in range(0, len(idx), batch_size):
        batch = dataset.batch(idx[start:start + batch_size])
        err = head.predict_aux(batch["hidden"], batch["mask"], batch["state"]) - batch[AUX_FIELD]  # (B, K)
        present = ~torch.isnan(err)
        squared += float(err[present].pow(2).sum())
        count += int(present.sum())
    head.train(was_training)
    return math.sqrt(squared / count) if count else math.nan


def _thin(idx: np.ndarray, max_samples: int) -> np.ndarray:
    """At most ``max_samples`` of ``idx``, spread evenly over it."""
    return idx[:: max(1, len(idx) // max_samples)][:max_samples]


def validation_indices(dataset: FeatureDataset, val_split: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(action validation samples, auxiliary validation samples), each at most ``cfg.val_max_samples``.

    The auxiliary ones are picked from the whole split before thinning: first frames are few, and
    every-k thinning of the split would keep almost none of them.
    """
    aux = aux_sample_indices(dataset, val_split, cfg.aux_first_frames)
    return _thin(val_split, cfg.val_max_samples), _thin(aux, cfg.val_max_samples)


def aux_sample_indices(dataset: FeatureDataset, idx: np.ndarray, first_frames: int) -> np.ndarray:
    """The samples of ``idx`` the auxiliary loss learns from: all, or each episode's first frames."""
    return idx[dataset.frame_index[idx] < first_frames] if first_frames else idx


def set_aux_stats(head: PolicyHead, dataset: FeatureDataset, train_idx: np.ndarray) -> None:
    """Normalise the auxiliary targets by the training split's mean and std (no-op without them).

    Over the present values; a target never present in the split gets mean 0, std 1.
    """
    if head.aux_predictor is None:
        return
    targets = dataset.aux_targets[torch.as_tensor(train_idx)].double().numpy()  # (N, K), NaN = absent
    seen = ~np.isnan(targets).all(0)  # (K,)
    mean, std = np.zeros(targets.shape[1]), np.ones(targets.shape[1])
    mean[seen], std[seen] = np.nanmean(targets[:, seen], 0), np.nanstd(targets[:, seen], 0)
    head.aux_predictor.set_stats(mean.astype(np.float32), std.astype(np.float32))


def set_feature_stats(head: PolicyHead, dataset: FeatureDataset, train_idx: np.ndarray,
                      max_samples: int = 4096, batch_size: int = 256) -> None:
    """Per layer and dimension mean and std of the training split's valid tokens, for a MoL that
    standardises its features (no-op otherwise). Up to ``max_samples`` samples spread over the split."""
    if head.mol.config.feature_norm != "standardize":
        return
    idx = _thin(train_idx, max_samples)
    contract = dataset.meta.contract
    total = torch.zeros(len(contract.layers), contract.width, dtype=torch.float64)  # (L, D)
    sq = torch.zeros_like(total)
    count = 0
    for start in range(0, len(idx), batch_size):
        batch = dataset.batch(idx[start:start + batch_size])
        weight = batch["mask"][:, None, :, None].double()  # (B, 1, T, 1): padding left out
        x = batch["hidden"].double() * weight  # (B, L, T, D)
        total += x.sum((0, 2))
        sq += (x * x).sum((0, 2))
        count += int(batch["mask"].sum())
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(head.mol.config.eps)
    head.mol.set_feature_stats(mean.float(), std.float())


def _optimizer(head: PolicyHead, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in head.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def save_train_state(optimizer: torch.optim.Optimizer, step: int, path: Path) -> None:
    state = optimizer.state_dict()
    tensors = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            tensors[f"state.{pid}.{name}"] = torch.as_tensor(value)
    meta = {"step": str(step), "param_groups": json.dumps(state["param_groups"])}
    atomic_save_safetensors(tensors, path, meta)


def load_train_state(optimizer: torch.optim.Optimizer, path: Path) -> int:
    check_safetensors_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    try:
        groups = json.loads(meta["param_groups"])
        step = int(meta["step"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this head ({exc})") from exc
    return step


def _save_all(head, optimizer, step, out: Path, run: RunConfig, data_dir: Path, history: dict, plot: bool) -> None:
    save_head(head, out)
    save_train_state(optimizer, step, out / TRAIN_STATE_NAME)
    record = {"run": to_dict(run), "data": str(data_dir), "step": step, "history": history}
    atomic_write_text(out / RUN_NAME, json.dumps(record, indent=2) + "\n")
    if plot:
        from m2vla_core.training.plots import plot_losses

        plot_losses(history, out / PLOT_NAME, title=run.preset or run.arch.action_head)


def train(data_dir: str | os.PathLike, out_dir: str | os.PathLike, run: RunConfig | None = None, *,
          resume: bool = False, progress: bool = True, plot: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) a head; returns the loss history. ``run.train.steps`` is the total (the
    LR schedule's length); ``stop_after`` ends the session early at that step with a resumable
    checkpoint (time-boxed jobs; an interrupted run)."""
    from m2vla_core.sim.tasks import reads_privileged_state

    run = run or run_config_from_preset()
    cfg = run.train
    data_dir, out = Path(data_dir), Path(out_dir)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after (--stop-after) must be >= 1, got {stop_after}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out {out} is a file; give a checkpoint directory")
    dataset = FeatureDataset(data_dir)
    if cfg.position_noise_m and not reads_privileged_state(dataset.meta.state_names):
        raise DatasetError(f"{data_dir}: position noise needs the named objects' x, y in the state "
                           "(`m2vla features --privileged-state`)")
    train_idx, full_val_idx = dataset.split_by_episode(cfg.val_fraction, seed=cfg.seed)
    val_idx, aux_val_idx = validation_indices(dataset, full_val_idx, cfg)
    history: dict[str, list] = {"train": [], "val": []}
    torch.manual_seed(cfg.seed)
    if resume:
        if not (out / TRAIN_STATE_NAME).is_file():
            raise CheckpointError(f"{out}: nothing to resume ({TRAIN_STATE_NAME} missing)")
        saved = read_run_record(out)
        saved_run = saved_run_config(out)
        if saved_run.arch != run.arch or {**to_dict(saved_run.train), "steps": 0} != {**to_dict(cfg), "steps": 0}:
            raise CheckpointError(f"{out}: --resume with a different config than the run being resumed "
                                  f"(only the step count may change)")
        head = load_head(out, backbone=(dataset.meta.backbone_id, dataset.meta.backbone_digest))
        if head.config != dataset.meta.head_config(run.arch):
            raise CheckpointError(f"{out}: checkpoint was trained on a dataset with another interface than {data_dir}")
        head.train()
        optimizer = _optimizer(head, cfg)
        start = load_train_state(optimizer, out / TRAIN_STATE_NAME)
        if cfg.steps < start:  # the LR schedule and train.json would describe a run shorter than the one saved
            raise ValueError(f"TrainConfig.steps (--steps) = {cfg.steps} is below step {start} that {out} "
                             f"was saved at; give --steps >= {start}")
        history = saved["history"]
    else:
        if (out / TRAIN_STATE_NAME).exists() or (out / "model.safetensors").exists():
            raise CheckpointError(f"{out}: already holds a checkpoint; pass --resume or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        head = PolicyHead(dataset.meta.head_config(run.arch))
        dataset_stats(dataset, train_idx, head).apply_to(head)
        set_aux_stats(head, dataset, train_idx)
        set_feature_stats(head, dataset, train_idx)
        if head.uses_memory:
            kept = head.build_memory(dataset, train_idx)
            log.info("skill memory: %d entries from %d training samples", kept, len(train_idx))
        head.train()
        optimizer = _optimizer(head, cfg)
        start = 0
    t0 = time.perf_counter()

    aux_train_idx = aux_sample_indices(dataset, train_idx, cfg.aux_first_frames)
    if head.aux_predictor is not None and not len(aux_train_idx):
        raise DatasetError(f"{data_dir}: no training samples for the auxiliary loss")

    def validate(step: int) -> None:
        means = validation_means(head, dataset, val_idx)
        history["val"].append((step, means["action"]))
        if "grasp_point_cm" in means:
            history.setdefault("val_grasp_point_cm", []).append((step, means["grasp_point_cm"]))
        rmse = aux_rmse(head, dataset, aux_val_idx) if head.aux_predictor is not None and len(aux_val_idx) else math.nan
        if math.isfinite(rmse):  # nothing to report where no target is present (and JSON has no NaN)
            history.setdefault("val_aux_rmse", []).append((step, rmse))

    if start == 0 and len(val_idx) and not history["val"]:
        validate(0)  # the untrained baseline
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    end = cfg.steps if stop_after is None else max(start, min(cfg.steps, int(stop_after)))
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = dataset.batch(_batch_indices(train_idx, step, cfg))
        if cfg.position_noise_m:
            batch["state"] = perturb_positions(batch["state"], cfg.position_noise_m, step, cfg)
        losses = _losses(head, batch, exclude=run.arch.msm.exclude_same_episode, action_loss=cfg.action_loss,
                         grasp_point=bool(cfg.grasp_point_weight))
        action_loss, aux_loss = losses.action, losses.aux
        if aux_loss is not None and cfg.aux_first_frames:  # its own batch: few samples qualify
            aux_loss = _losses(head, dataset.batch(_batch_indices(aux_train_idx, step, cfg, stream=1)), exclude=False,
                               grasp_point=False).aux
        loss = action_loss if aux_loss is None else action_loss + run.arch.aux_weight * aux_loss
        if cfg.grasp_point_weight:
            loss = loss + cfg.grasp_point_weight * losses.grasp_point_cm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        history["train"].append((done, action_loss.item()))
        if len(val_idx) and (done % cfg.val_every == 0 or done == cfg.steps):
            validate(done)
        if bar is not None:
            bar.update(1)
            post = {"loss": f"{action_loss.item():.4f}"}
            if history["val"]:
                post["val"] = f"{history['val'][-1][1]:.4f}"
            if history.get("val_grasp_point_cm"):
                post["grasp_cm"] = f"{history['val_grasp_point_cm'][-1][1]:.2f}"
            if history.get("val_aux_rmse"):
                post["aux_rmse"] = f"{history['val_aux_rmse'][-1][1]:.4f}"
            bar.set_postfix(post, refresh=False)
        if done % cfg.ckpt_every == 0 and done != end:
            _save_all(head, optimizer, done, out, run, data_dir, history, plot=False)
    if bar is not None:
        bar.close()
    final = max(end, start)
    _save_all(head, optimizer, final, out, run, data_dir, history, plot=plot)
    return TrainResult(out, final, [tuple(x) for x in history["train"]], [tuple(x) for x in history["val"]],
                       time.perf_counter() - t0, [tuple(x) for x in history.get("val_aux_rmse", [])],
                       [tuple(x) for x in history.get("val_grasp_point_cm", [])])
