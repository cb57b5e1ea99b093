"""Text-only probe of the backbone: next-token loss and logits on a fixed text set.

It answers "did training this policy change the VLM?" with tensors, not claims:
- Frozen path: load the backbone, probe, train a MoL head (``mol+mlp``: MSM adds a memory, not
  a path into the backbone) for some steps on features the backbone extracts live (gradients
  flow through the head only), probe again. The logits must be bit-identical (``torch.equal``),
  and the parameter fingerprint unchanged.
- LoRA path: probe the base model, then the same model with the trained adapter active,
  merged into the weights, and disabled. Active / merged change the logits; disabled gives
  back the base logits exactly (LoRA adds to, never overwrites, the base weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

# Fixed probe text: instruction-like and plain sentences, in the tiny tokenizer's vocabulary.
PROBE_TEXTS = (
    "pick up the red cube and place it on the blue tray",
    "push the green block into the yellow zone",
    "stack the blue cube on the red cube",
    "move the gripper above the yellow cube",
    "put the green cube in the tray",
    "lift the red block off the table",
    "open the drawer and put the cup inside",
    "the robot arm moves to the home position slowly",
    "place the small bowl next to the large plate",
    "close the door then press the button",
    "grab the bottle and pour it into the cup",
    "the blue sponge is on the left of the pink towel",
)


@dataclass
class ProbeResult:
    loss: float  # mean next-token cross-entropy [nats/token] over the probe set
    logits: torch.Tensor  # (N_tokens, V) float32, concatenated over the probe texts


@torch.inference_mode()
def text_probe(model, tokenizer, texts=PROBE_TEXTS) -> ProbeResult:
    """Next-token loss and logits of a (Qwen2-VL) model on text only, one text at a time (no padding)."""
    was_training = model.training
    model.eval()
    all_logits, nll, count = [], 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # (1, S)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()  # (S, V)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
        all_logits.append(logits)
    model.train(was_training)
    return ProbeResult(nll / count, torch.cat(all_logits))


def compare(a: ProbeResult, b: ProbeResult) -> dict:
    return {"loss_before": a.loss, "loss_after": b.loss, "bit_identical": bool(torch.equal(a.logits, b.logits)),
            "max_abs_logit_diff": float((a.logits - b.logits).abs().max())}


def frozen_backbone_probe(feature_steps: int = 20, *, backbone_path=None, seed: int = 0) -> dict:
    """Probe -> train a MoL+MLP head for ``feature_steps`` steps on live backbone features -> probe."""
    from m2vla_core.backbone.adapter import FrozenBackbone
    from m2vla_core.backbone.tiny import default_backbone_path
    from m2vla_core.heads.configuration_head import HeadConfig
    from m2vla_core.heads.factory import get_preset
    from m2vla_core.heads.policy_head import PolicyHead
    from m2vla_core.sim import SimConfig, TaskEnv, task_names

    torch.manual_seed(seed)
    bb = FrozenBackbone.from_pretrained(backbone_path or default_backbone_path())
    before = text_probe(bb.model, bb.tokenizer)
    fp_before = bb.parameter_fingerprint()
    contract = bb.contract((0, 2, 4, 6), num_image_tokens=16, num_text_tokens=12)
    arch = get_preset("mol+mlp")  # MSM needs a memory built from a dataset; the MoL + head path is what touches the backbone
    head = PolicyHead(HeadConfig(contract=contract, state_dim=8, action_space="joint", action_dim=8, chunk_len=16, dt_s=0.1,
                                 backbone_id=bb.backbone_id, backbone_digest=bb.weights_digest, arch=arch))
    head.normalizer.set_stats(np.zeros(8), np.ones(8), np.zeros(8), np.ones(8))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    with TaskEnv(SimConfig()) as env:
        for step in range(feature_steps):
            obs = env.reset(task_names()[step % len(task_names())], step)
            bundle = bb.extract(obs.image, obs.instruction, contract)
            hidden = bundle.hidden.float()[None].requires_grad_(False)  # (1, L, T, D)
            state = torch.as_tensor(obs.joint_positions, dtype=torch.float32)[None]  # (1, S)
            target = torch.as_tensor(rng.normal(size=(1, 16, 8)), dtype=torch.float32)  # (1, H, A)
            loss = torch.nn.functional.mse_loss(head(hidden, bundle.mask[None], state), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    bb.assert_frozen()
    after = text_probe(bb.model, bb.tokenizer)
    return {"path": "frozen backbone + MoL head trained on live features", "head_steps": feature_steps,
            "fingerprint_unchanged": fp_before == bb.parameter_fingerprint(), **compare(before, after)}


def lora_probe(policy) -> dict:
    """Base vs adapter active / merged / disabled for a trained ``TextActionPolicy``."""
    from m2vla_core.baselines.text_policy import load_base_model

    base_model, tok, _, _, _ = load_base_model()
    base = text_probe(base_model, tok)
    peft_model = policy.model
    active = text_probe(peft_model, tok)
    with peft_model.disable_adapter():
        disabled = text_probe(peft_model, tok)
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    merged = text_probe(merged_model, tok)
    return {"adapter_active": compare(base, active), "adapter_merged": compare(base, merged),
            "adapter_disabled": compare(base, disabled)}
