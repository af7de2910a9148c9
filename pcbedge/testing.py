"""Shared test fixtures: tiny random-weight models built in-process (no downloads).

Plain functions, not pytest fixtures, so tests, notebooks and subprocess checks can all call them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_NUM_REGIONS = 8


def tiny_pcbvlm_model(*, input_size: int = 128, seed: int = 0, num_regions: int = TINY_NUM_REGIONS):
    """A random-weight PcbVlm with 2 decoder layers and d_model 32 (seconds to export)."""
    import torch

    from pcbedge.data.qa import vocabulary_corpus
    from pcbedge.families.pcbvlm.model.config import PcbVlmConfig, TextConfig, VisionConfig
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(vocabulary_corpus(), num_regions)
    cfg = PcbVlmConfig(
        input_size=input_size,
        vision=VisionConfig(widths=(8, 8, 16, 16, 32), fpn_ch=16, head_ch=16,
                            num_regions=num_regions),
        text=TextConfig(vocab_size=tok.get_vocab_size(), num_regions=num_regions, d_model=32,
                        n_layers=2, n_heads=2, d_ff=64))
    model = PcbVlm(cfg, tok)
    with torch.no_grad():  # non-zero type/pointer embeddings so every parameter is exercised
        for p in (model.decoder.type_vis, model.decoder.type_reg, model.decoder.ptr_in):
            p.normal_(std=0.1)
        # a random head gives nearly equal heatmap scores everywhere (~0.104); ORT and torch
        # then rank near-ties (1e-7 apart) differently. Spread the logits like a trained head.
        model.vision.head.heat[-1].weight.mul_(25.0)
    return model.eval()


def tiny_pcbvlm(tmp_path: str | Path, *, input_size: int = 128, seed: int = 0,
                name: str = "tiny-pcbvlm") -> Path:
    """Save a tiny random PcbVlm under ``tmp_path/name`` and return that model folder."""
    out = Path(tmp_path) / name
    tiny_pcbvlm_model(input_size=input_size, seed=seed).save_pretrained(out)
    return out


def random_pair_input(size: int | tuple[int, int] = 128, seed: int = 0) -> np.ndarray:
    """A preprocessed-looking input [3, H, W] float32: test, template, |test - template|."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    template = rng.random((h, w), dtype=np.float32)
    test = template.copy()
    y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
    test[y:y + 12, x:x + 12] = 1.0 - test[y:y + 12, x:x + 12]
    return np.stack([test, template, np.abs(test - template)]).astype(np.float32)


def write_pair_images(folder: str | Path, size: tuple[int, int] = (200, 150),
                      seed: int = 0) -> tuple[Path, Path]:
    """(test.png, template.png) of ``size`` (w, h) with one bright square on the test image."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    template = rng.integers(20, 60, (h, w), dtype=np.uint8)
    test = template.copy()
    test[h // 3:h // 3 + 20, w // 3:w // 3 + 20] = 230
    tp, mp = folder / "board_test.png", folder / "board_temp.png"
    Image.fromarray(test).save(tp)
    Image.fromarray(template).save(mp)
    return tp, mp


def tiny_bundle(root: str | Path, **export_kwargs) -> tuple[Path, Path]:
    """``(model_dir, bundle_dir)``: a tiny model exported under ``root``, reused when ``root``
    already holds a complete export (tests of several modules share one export per session).
    Tests that modify the bundle must copy it first."""
    from pcbedge.export.exporter import export_model

    root = Path(root)
    model_dir, bundle_dir = root / "tiny-pcbvlm", root / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        if not (model_dir / "config.json").is_file():
            tiny_pcbvlm(root)
        export_kwargs.setdefault("check_boards", 2)
        export_kwargs.setdefault("progress", False)
        export_model(model_dir, bundle_dir, overwrite=True, **export_kwargs)
    return model_dir, bundle_dir


# -- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_CORPUS = ("where are the defects on this board? short open mousebite spur copper pin-hole "
                "spurious missing hole the board has no defect. there are 2 shorts at "
                "(120,340),(180,400) json defects type bbox_2d system user assistant you are a "
                "helpful assistant. 0 1 2 3 4 5 6 7 8 9 { } [ ] : , \" ").split()


def tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer (like Qwen's) with Qwen's special tokens, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(_QWEN_CORPUS)] * 4, trainer)
    return tok


QWEN_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    "min_pixels": 56 * 56, "max_pixels": 448 * 448, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2}


def tiny_qwen2_vl_model(variant: str = "qwen2_vl", *, hidden: int = 64, layers: int = 2,
                        heads: int = 4, kv_heads: int = 2, vision_dim: int = 32,
                        vision_depth: int = 2, vision_heads: int = 2, intermediate: int = 0,
                        seed: int = 0):
    """A random-weight Qwen2-VL (``variant`` "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") with the
    tiny tokenizer's vocabulary and special-token ids; returns ``(model, tokenizer)``."""
    import torch
    import transformers as tf

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // heads
    half, s3 = head_dim // 2, 3 * head_dim // 16
    text = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                rope_scaling={"type": "mrope", "mrope_section": [half - 2 * s3, s3, s3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    if variant == "qwen2_vl":
        cls, cfg_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden,
                      num_heads=vision_heads, mlp_ratio=2.0, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
    elif variant == "qwen2_5_vl":
        cls, cfg_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig
        # window 56 px = 2x2 merged tokens: several windows even on small test images
        vision = dict(depth=vision_depth, hidden_size=vision_dim,
                      intermediate_size=2 * vision_dim, num_heads=vision_heads,
                      out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1])
    else:
        raise ValueError(f"unknown variant {variant!r}")
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], **text)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random init is near-uniform; spread the logits like a trained head
        model.lm_head.weight.normal_(std=0.5)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, tok


def tiny_qwen2_vl(tmp_path: str | Path, variant: str = "qwen2_vl", *, name: str | None = None,
                  chat_template: str | None = None, **model_kwargs) -> Path:
    """Save a tiny random Qwen2(.5)-VL in the Hugging Face layout (config.json,
    model.safetensors, tokenizer.json, preprocessor_config.json, chat_template.jinja) and return
    the folder. ``chat_template``: the template it was "fine-tuned" with (default: Qwen2-VL's)."""
    import json

    from pcbedge.families.qwen_vl.templates import QWEN2_VL_TEMPLATE

    out = Path(tmp_path) / (name or f"tiny-{variant}")
    model, tok = tiny_qwen2_vl_model(variant, **model_kwargs)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR, indent=2))
    (out / "chat_template.jinja").write_text(chat_template or QWEN2_VL_TEMPLATE)
    return out
