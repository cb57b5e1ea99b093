"""Build a tiny random-weight VLM of a real transformers architecture, fully offline.

No model can be downloaded on the project's machines, yet every test, benchmark and demo
must run the same code path a real checkpoint uses (``from_pretrained(dir)``). So we build
the real model class from a small config with seeded random weights, train a small
byte-level BPE tokenizer on a built-in robot-instruction corpus, and save everything with
``save_pretrained``. Given the seed the weights are bit-identical across runs on one machine.

Families: ``qwen2_vl`` (Qwen2VLForConditionalGeneration, the shipped default), ``idefics3``
(Idefics3ForConditionalGeneration), and their siblings ``qwen2_5_vl`` (Qwen2.5-VL, windowed
vision attention) and ``smolvlm`` (SmolVLMForConditionalGeneration).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

FAMILIES = ("qwen2_vl", "idefics3", "qwen2_5_vl", "smolvlm")
MANIFEST_NAME = "m2vla_backbone.json"  # family, seed, weights digest; written beside the weights
TINY_IMAGE_SIZE = 224  # px, square input both tiny families expect

# Words the tokenizer must cover well: robot-instruction vocabulary.
_COLOURS = "red green blue yellow orange purple black white pink brown grey gray cyan magenta".split()
_OBJECTS = ("cube block box tray bowl cup mug plate bottle can ball sphere cylinder drawer door lid "
            "button handle peg hole bin basket shelf table target marker object objects item items "
            "sponge towel spoon fork knife pot pan stove microwave cabinet fridge cloth rope").split()
_VERBS = ("pick place put push pull stack unstack reach grasp grab lift lower move slide open close "
          "turn rotate press insert drop hold release wipe pour sort align touch point go return "
          "stop wait fold flip poke hang").split()
_RELATIONS = ("on in into onto inside under over above below behind beside near next to left right "
              "front back top bottom middle center centre between of the a an it them and then "
              "up down away toward towards from with").split()
_MISC = ("first second third last small large big tiny other all each one two three four five "
         "slowly quickly carefully gently please robot arm gripper home position").split()


def _corpus() -> list[str]:
    """Deterministic training sentences: every word alone plus templated instructions."""
    words = _COLOURS + _OBJECTS + _VERBS + _RELATIONS + _MISC
    lines = list(words) + [f"and {w}" for w in words]  # each word also after a space ("Ġword")
    for verb, colour, obj in itertools.product(_VERBS, _COLOURS[:6], _OBJECTS[:12]):
        lines.append(f"{verb} up the {colour} {obj} and then place it")
    for colour, obj, rel, colour2, obj2 in itertools.product(
        _COLOURS[:4], _OBJECTS[:6], ("on", "in", "into", "onto", "next to"), _COLOURS[:4], _OBJECTS[:6]
    ):
        lines.append(f"put the {colour} {obj} {rel} the {colour2} {obj2}")
    return lines


def _special_tokens(family: str) -> list[str]:
    if family.startswith("qwen"):
        return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    return ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
            "<global-img>"] + rows


def build_tokenizer(family: str, vocab_size: int = 768):
    """A byte-level BPE tokenizer (any UTF-8 text encodes, no <unk>) wrapped for save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_tokens(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", unk_token=None)
    wrapped.model_max_length = 4096
    return wrapped


def _qwen_vl_model(tokenizer, seed: int, family: str):
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _special_tokens(family)}
    vocab = -(-len(tokenizer) // 64) * 64
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=True)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens), Qwen2VLForConditionalGeneration
    else:  # one windowed + one full-attention vision block, as in Qwen2.5-VL
        vision = dict(depth=2, hidden_size=64, out_hidden_size=128, intermediate_size=128, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    return cls(config).eval()


def _qwen2_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE  # fixed 224x224 -> 16x16 patches -> 8x8 = 64 tokens
    return Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels})


def _idefics3_model(tokenizer, seed: int, family: str):
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _special_tokens(family)}
    vocab = -(-len(tokenizer) // 64) * 64
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=128, intermediate_size=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_theta=10000.0, pad_token_id=ids["<|endoftext|>"],
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=16)  # 14x14 patches -> pixel shuffle 2 -> 49 tokens
    config_cls, cls = ((Idefics3Config, Idefics3ForConditionalGeneration) if family == "idefics3"
                       else (SmolVLMConfig, SmolVLMForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                        scale_factor=2, pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    return cls(config).eval()


def _idefics3_processor(tokenizer, model):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": TINY_IMAGE_SIZE}, max_image_size={"longest_edge": TINY_IMAGE_SIZE},
        do_image_splitting=False)
    seq_len = model.model.image_seq_len
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len)


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the safetensors weight files of a model dir (file names + bytes, sorted).

    A head records this digest; loading it against any other backbone fails loudly.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in {model_dir}")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def make_tiny_vlm(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0, *, overwrite: bool = False) -> Path:
    """Build, save and return ``out_dir``: weights, config, tokenizer, processor, manifest.

    A non-empty ``out_dir`` is refused unless ``overwrite``: its config.json / model.safetensors
    (a head checkpoint's, say) would be replaced without a word."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; give a directory")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; choose another directory or pass --overwrite (overwrite=True)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    if family.startswith("qwen"):
        model = _qwen_vl_model(tokenizer, seed, family)
        tokenizer.save_pretrained(out_dir)  # the Qwen processor class needs torchvision: save its parts
        _qwen2_vl_image_processor().save_pretrained(out_dir)
    elif family == "idefics3":
        model = _idefics3_model(tokenizer, seed, family)
        _idefics3_processor(tokenizer, model).save_pretrained(out_dir)
    else:
        model = _idefics3_model(tokenizer, seed, family)
        tokenizer.save_pretrained(out_dir)
        _idefics3_processor(tokenizer, model).image_processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for path in out_dir.glob("*.safetensors"):
        path.chmod(0o644)  # save_pretrained writes 0600; the shipped asset must be world-readable
    for stray in ("generation_config.json",):  # carries no information for a frozen feature extractor
        (out_dir / stray).unlink(missing_ok=True)
    manifest = {"family": family, "seed": seed, "weights_sha256": weights_digest(out_dir),
                "num_parameters": sum(p.numel() for p in model.parameters())}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def default_backbone_path() -> Path:
    """The shipped tiny Qwen2-VL backbone (built by ``m2vla make-tiny-vlm``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tiny_qwen2vl"


def recorded_digest(model_dir: str | Path) -> str:
    """The weights digest written by make_tiny_vlm, or "" when the dir carries no manifest."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return ""
    return str(json.loads(path.read_text(encoding="utf-8")).get("weights_sha256", ""))


def default_backbone_digest() -> str:
    """Recorded weights digest of the shipped tiny backbone (what heads trained on it store)."""
    return recorded_digest(default_backbone_path())


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m2vla make-tiny-vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="output directory (created)")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        out = make_tiny_vlm(args.dir, family=args.family, seed=args.seed, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"m2vla make-tiny-vlm: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    size_b = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{args.family} tiny VLM -> {out} ({manifest['num_parameters']} params, {size_b / 1e6:.2f} MB, "
          f"weights sha256 {manifest['weights_sha256'][:16]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
