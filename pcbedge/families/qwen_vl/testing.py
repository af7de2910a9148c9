"""Test fixtures of the Qwen2-VL / Qwen2.5-VL family: tiny random-weight checkpoints in the
Hugging Face layout, with a byte-level BPE tokenizer trained in-process (no downloads)."""
from __future__ import annotations

from pathlib import Path

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


TINY_NAME = "tiny-qwen2_vl"   # the folder tiny_model saves into


def tiny_model(folder: str | Path, name: str = TINY_NAME, variant: str = "qwen2_vl") -> Path:
    """The ``testing`` role: a tiny Qwen2-VL (or ``variant`` "qwen2_5_vl") saved under
    ``folder/name``."""
    return tiny_qwen2_vl(folder, variant, name=name)
