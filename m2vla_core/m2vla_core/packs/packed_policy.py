"""Combine packs into one policy (no retraining of any pack) and run it with the router.

``PackedPolicy`` has the ``HeadPolicy`` interface (``config``, ``reset``, ``infer``), so the
policy engine, the ROS node and the evaluation agent run it unchanged. Per episode it routes
once, on the first observation after ``reset``; the chosen pack then acts until the next
reset. A route whose probability is below ``min_confidence``, or an instruction less similar
than ``min_instruction_similarity`` to every instruction the packs were trained on, is a
refusal: ``infer`` returns None for the rest of the episode and ``refusal_reason`` says why
(the controller holds). The similarity gate exists because the router's softmax always names
some pack, confidently, even for a task no pack covers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from m2vla_core.config_io import save_json
from m2vla_core.heads.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_config_file,
                                        load_head_config)
from m2vla_core.heads.configuration_head import HeadConfig
from m2vla_core.export.runtime import checked_inputs
from m2vla_core.packs.configuration_packs import (PACK_INFO_NAME, PACK_SET_NAME, PACKS_DIR, ROUTER_DIR,
                                                  ROUTER_EXAMPLES_NAME, PackInfo, PackRef, PackSetConfig, RouterConfig,
                                                  RouterTrainConfig)
from m2vla_core.packs.pack import load_pack_info, load_router_examples
from m2vla_core.packs.router import (TaskRouter, instruction_vectors, leave_one_out_similarity, load_instruction_bank,
                                     load_router, pool_features, save_instruction_bank, save_router, train_router,
                                     unique_rows)

AUTO_SIMILARITY_PERCENTILE = 10.0  # of the training instructions' leave-one-out similarities

SHARED_FIELDS = ("contract", "state_dim", "action_space", "action_dim", "chunk_len", "dt_s", "backbone_id",
                 "backbone_digest", "state_names", "action_names")
PACK_FILES = (CONFIG_NAME, WEIGHTS_NAME, "model.onnx", PACK_INFO_NAME, ROUTER_EXAMPLES_NAME)


def check_shared_interface(configs: dict[str, HeadConfig]) -> HeadConfig:
    """All packs must read the same features and state and emit the same actions; -> the first config."""
    names = list(configs)
    first = configs[names[0]]
    for name in names[1:]:
        for f in SHARED_FIELDS:
            a, b = getattr(first, f), getattr(configs[name], f)
            if a != b:
                raise CheckpointError(f"packs {names[0]!r} and {name!r} differ in {f} ({a!r} vs {b!r}); packs of one "
                                      f"policy must share the feature contract, state, action space and backbone")
    return first


@dataclass
class CombineReport:
    out: Path
    packs: dict[str, tuple[str, ...]]  # name -> tasks
    router_val_accuracy: float  # held-out episodes of the packs' own router examples
    router_train_accuracy: float
    router_parameters: int
    num_examples: int
    layer_weights: list[float] = field(default_factory=list)
    num_instructions: int = 0  # distinct training instructions in the gate's bank
    min_instruction_similarity: float = 0.0


def combine_packs(pack_dirs, out_dir: str | os.PathLike, *, min_confidence: float = 0.8,
                  min_instruction_similarity: float | None = None, router_train: RouterTrainConfig | None = None,
                  router_hidden: int = 64, overwrite: bool = False) -> CombineReport:
    """Copy packs into a self-contained pack set and train its router from their examples.

    ``min_instruction_similarity`` None calibrates the instruction gate from the data: the
    10th percentile of each distinct training instruction's similarity to its nearest other
    one (how far a new phrasing of a covered task may stray); 0 disables the gate.

    Refuses packs that do not share the feature contract / state / action interface, duplicate
    pack names, and two packs claiming the same task (the router could not tell them apart).
    """
    pack_dirs = [Path(p) for p in pack_dirs]
    if not pack_dirs:
        raise ValueError("combine_packs: give at least one pack")
    infos: dict[str, PackInfo] = {}
    configs: dict[str, HeadConfig] = {}
    dirs: dict[str, Path] = {}
    for d in pack_dirs:
        info = load_pack_info(d)
        if info.name in infos:
            raise ValueError(f"two packs are named {info.name!r} ({dirs[info.name]} and {d})")
        for other, oinfo in infos.items():
            shared = sorted(set(info.tasks) & set(oinfo.tasks))
            if shared:
                raise ValueError(f"packs {other!r} and {info.name!r} both claim tasks {shared}")
        infos[info.name], configs[info.name], dirs[info.name] = info, load_head_config(d), d
    shared = check_shared_interface(configs)
    names = tuple(infos)
    xs, ys, eps = [], [], []
    for label, name in enumerate(names):
        ex = load_router_examples(dirs[name])
        want = (len(shared.contract.layers), 2, shared.contract.width)
        if tuple(ex["pooled"].shape[1:]) != want:
            raise CheckpointError(f"{dirs[name]}: router examples shaped {tuple(ex['pooled'].shape)}, expected (N, *{want})")
        xs.append(ex["pooled"])
        ys.append(np.full(len(ex["pooled"]), label))
        eps.append(ex["episode_index"].numpy() + label * 1_000_000)  # episode ids are per dataset: keep them apart
    rcfg = RouterConfig(pack_names=names, num_layers=len(shared.contract.layers), width=shared.contract.width,
                        num_image_tokens=shared.contract.num_image_tokens, hidden=router_hidden)
    pooled = torch.cat(xs)
    fit = train_router(rcfg, pooled, np.concatenate(ys), np.concatenate(eps), router_train)
    bank = unique_rows(instruction_vectors(pooled))
    if min_instruction_similarity is None:
        min_instruction_similarity = float(np.percentile(leave_one_out_similarity(bank), AUTO_SIMILARITY_PERCENTILE))

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / PACK_SET_NAME).is_file():
            raise FileExistsError(f"{out}: not empty and not a pack set; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        refs = []
        for name in names:
            dst = tmp / PACKS_DIR / name
            dst.mkdir(parents=True)
            for fname in PACK_FILES:
                if (dirs[name] / fname).is_file():
                    shutil.copy2(dirs[name] / fname, dst / fname)
            refs.append(PackRef(name=name, path=f"{PACKS_DIR}/{name}"))
        save_router(fit.router, tmp / ROUTER_DIR)
        save_instruction_bank(bank, tmp / ROUTER_DIR)
        save_json(PackSetConfig(packs=tuple(refs), min_confidence=min_confidence,
                                min_instruction_similarity=round(float(min_instruction_similarity), 6)),
                  tmp / PACK_SET_NAME)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CombineReport(out=out, packs={n: infos[n].tasks for n in names}, router_val_accuracy=fit.val_accuracy,
                         router_train_accuracy=fit.train_accuracy, router_parameters=fit.router.num_parameters(),
                         num_examples=fit.num_train + fit.num_val, layer_weights=fit.router.layer_weights().tolist(),
                         num_instructions=len(bank), min_instruction_similarity=float(min_instruction_similarity))


@dataclass(frozen=True)
class RouteDecision:
    pack: str  # the router's best pack
    confidence: float  # its probability
    probabilities: dict[str, float]
    instruction_similarity: float  # to the nearest training instruction; nan without a bank
    refusal: str  # why the policy refuses this episode; "" = it acts


def load_pack_set_config(path: str | os.PathLike) -> PackSetConfig:
    return load_config_file(PackSetConfig, Path(path) / PACK_SET_NAME,
                            f"{path}: no {PACK_SET_NAME}; not a pack set (make one with `m2vla pack combine`)")


class PackedPolicy:
    """Several packs + a router behind ``HeadPolicy``'s interface; refuses when unsure."""

    def __init__(self, packs: dict, router: TaskRouter, set_config: PackSetConfig,
                 pack_infos: dict[str, PackInfo] | None = None, path: str = "",
                 instruction_bank: torch.Tensor | None = None) -> None:
        names = set_config.pack_names
        if tuple(packs) != names:
            raise CheckpointError(f"packs {tuple(packs)} do not match {PACK_SET_NAME} {names}")
        if tuple(router.config.pack_names) != names:
            raise CheckpointError(f"router was trained for packs {router.config.pack_names}, the set has {names}; "
                                  "re-run `m2vla pack combine`")
        self.config: HeadConfig = check_shared_interface({n: p.config for n, p in packs.items()})
        c = self.config.contract
        rc = router.config
        if (rc.num_layers, rc.width, rc.num_image_tokens) != (len(c.layers), c.width, c.num_image_tokens):
            raise CheckpointError(f"router reads (layers, width, image tokens) = {(rc.num_layers, rc.width, rc.num_image_tokens)}, "
                                  f"packs' contract has {(len(c.layers), c.width, c.num_image_tokens)}")
        self.packs = packs
        self.router = router
        self.set_config = set_config
        self.pack_infos = pack_infos or {}
        self.path = path
        self.min_confidence = float(set_config.min_confidence)
        self.min_instruction_similarity = float(set_config.min_instruction_similarity)
        if self.min_instruction_similarity > 0 and instruction_bank is None:
            raise CheckpointError(f"{PACK_SET_NAME} sets min_instruction_similarity but the router has no "
                                  f"instruction bank; re-run `m2vla pack combine`")
        self.instruction_bank = instruction_bank  # (M, L * D) unit vectors
        self.forced_pack = ""  # set when the task is named: the router is skipped
        self.reset()

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu", *,
             backbone: tuple[str, str] | None = None, threads: int = 1) -> "PackedPolicy":
        from m2vla_core.export.runtime import HeadPolicy

        root = Path(path)
        set_config = load_pack_set_config(root)
        packs, infos = {}, {}
        for ref in set_config.packs:
            pack_dir = root / ref.path
            infos[ref.name] = load_pack_info(pack_dir)
            if infos[ref.name].name != ref.name:
                raise CheckpointError(f"{pack_dir}: pack.json names {infos[ref.name].name!r}, {PACK_SET_NAME} says {ref.name!r}")
            packs[ref.name] = HeadPolicy.load(pack_dir, backend=backend, device=device, backbone=backbone, threads=threads)
        router = load_router(root / set_config.router)
        bank = load_instruction_bank(root / set_config.router, router.config.num_layers * router.config.width)
        return cls(packs, router, set_config, infos, str(root), bank)

    # -- state per episode --------------------------------------------------------------------
    @property
    def pack_names(self) -> tuple[str, ...]:
        return self.set_config.pack_names

    def pack_for_task(self, task: str) -> str:
        """The pack whose pack.json lists ``task`` ('' if none)."""
        for name, info in self.pack_infos.items():
            if task in info.tasks:
                return name
        return ""

    def force_pack(self, name: str) -> None:
        """Use pack ``name`` whatever the observation (the task is named); '' restores routing."""
        if name and name not in self.packs:
            raise KeyError(f"unknown pack {name!r}; this set has {self.pack_names}")
        self.forced_pack = name
        self.reset()

    def reset(self) -> None:
        self.routed_pack = ""
        self.route_confidence = 0.0
        self.route_probabilities: dict[str, float] = {}
        self.instruction_similarity = float("nan")  # to the nearest training instruction, at the route
        self.refusal_reason = ""
        self._refused = False
        for p in getattr(self, "packs", {}).values():
            p.reset()

    # -- routing ------------------------------------------------------------------------------
    def _pooled(self, hidden: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        return pool_features(np.asarray(hidden, dtype=np.float32), np.asarray(mask, dtype=bool),
                             self.config.contract.num_image_tokens).unsqueeze(0)  # (1, L, 2, D)

    def decide(self, hidden: np.ndarray, mask: np.ndarray) -> RouteDecision:
        """The route for one observation and whether to refuse it; pure (no state change).

        The one place both refusal rules live: ``infer`` acts on it, ``router_accuracy`` counts it.
        """
        pooled = self._pooled(hidden, mask)
        probs = self.router.probabilities(pooled)[0].numpy()  # (n_packs,)
        best = int(np.argmax(probs))
        name, conf = self.pack_names[best], float(probs[best])
        similarity = (float("nan") if self.instruction_bank is None
                      else float((self.instruction_bank @ instruction_vectors(pooled)[0]).max()))
        refusal = ""
        if similarity < self.min_instruction_similarity:
            refusal = (f"instruction unlike any the packs were trained on: similarity {similarity:.3f} < "
                       f"min_instruction_similarity {self.min_instruction_similarity:.3f}; refusing to act this episode")
        elif conf < self.min_confidence:
            refusal = (f"task router is not confident: best pack {name!r} at p={conf:.2f} < "
                       f"min_confidence {self.min_confidence:.2f}; refusing to act this episode")
        return RouteDecision(name, conf, {n: float(p) for n, p in zip(self.pack_names, probs)}, similarity, refusal)

    def route(self, hidden: np.ndarray, mask: np.ndarray) -> tuple[str, float, dict[str, float]]:
        """(best pack, its probability, all probabilities) for one observation; pure (no state change)."""
        d = self.decide(hidden, mask)
        return d.pack, d.confidence, d.probabilities

    def instruction_similarity_of(self, hidden: np.ndarray, mask: np.ndarray) -> float:
        """Cosine similarity of the observation's instruction to the nearest training one (nan: no bank)."""
        return self.decide(hidden, mask).instruction_similarity

    def infer(self, hidden: np.ndarray, mask: np.ndarray, state: np.ndarray) -> np.ndarray | None:
        """features (L, T, D), mask (T,), state (S,) -> chunk (H, A) of the routed pack, or None (refusal)."""
        hidden, mask, state = checked_inputs(self.config, hidden, mask, state, expects="packs expect")
        if self._refused:
            return None
        if not self.routed_pack:
            if self.forced_pack:
                self.routed_pack, self.route_confidence = self.forced_pack, 1.0
            else:
                d = self.decide(hidden, mask)
                self.route_probabilities, self.route_confidence = d.probabilities, d.confidence
                self.instruction_similarity = d.instruction_similarity
                if d.refusal:
                    self._refused = True
                    self.refusal_reason = d.refusal
                    return None
                self.routed_pack = d.pack
        return self.packs[self.routed_pack].infer(hidden, mask, state)


def with_min_confidence(path: str | os.PathLike, min_confidence: float) -> None:
    """Rewrite a pack set's refusal threshold in place (no retraining)."""
    save_json(replace(load_pack_set_config(path), min_confidence=min_confidence), Path(path) / PACK_SET_NAME)
