"""Qwen2-VL / Qwen2.5-VL's own manifest fields (their ``schema`` role): the vision tower's
geometry the numpy preprocessing and rotary tables are built from, the KV cache the runner
allocates, and the reply's token ids. Checked when a bundle opens, after the core schema, so an
edited ``vision.patch_size`` or an ``image_token_id`` past the vocabulary is a BundleError naming
the field, not a reshape error in the middle of an answer. Torch-free.
"""
from __future__ import annotations

from pcbedge.bundle.schema import Bool, Int, List, Map, Num, Obj, Str, Violation

TOKEN = Int(0, 1 << 24)

MANIFEST = {
    "vision": Obj({
        "windowed": Bool(),
        "spatial_merge_size": Int(1, 16),
        "patch_size": Int(1, 1024),
        "num_heads": Int(1, 1024),
        "head_dim": Int(1, 8192),
        "window_size": Int(1, 1 << 16, nullable=True),
        "rotary_theta": Num(0.0, 1e9, lo_open=True),
    }, required=("windowed", "spatial_merge_size", "patch_size", "num_heads", "head_dim")),
    "kv_cache": Obj({"num_layers": Int(1, 1024), "num_heads": Int(1, 1024),
                     "head_dim": Int(1, 8192), "max_positions": Int(1, 1 << 24)},
                    required=("num_layers", "num_heads", "head_dim", "max_positions")),
    "vocab": Obj({k: Int(0, 1 << 24) for k in ("text", "regions", "logits")},
                 required=("text", "logits")),
    "answer": Obj({
        "box_coordinates": Str(("resized_pixels", "norm1000")),
        "defect_types": List(Str(max_len=64), min_len=1, max_len=64),
        "image_token_id": TOKEN,
        "eos_token_ids": List(TOKEN, min_len=1, max_len=16),
        "system_prompt": Str(max_len=1 << 16, nullable=True),
        "special_tokens": Map(Str(max_len=128)),
    }, required=("box_coordinates", "image_token_id", "eos_token_ids")),
}


def _token_ids_in_vocabulary(m: dict) -> None:
    logits, ans = m["vocab"]["logits"], m["answer"]
    for name, ids in (("image_token_id", [ans["image_token_id"]]),
                      ("eos_token_ids", ans["eos_token_ids"])):
        for i, token in enumerate(ids):
            if token >= logits:
                path = f"answer.{name}" + ("" if name == "image_token_id" else f"[{i}]")
                raise Violation(path, token, f"a token id below vocab.logits ({logits})")


def _grid_fits_the_patches(m: dict) -> None:
    v = m["vision"]
    stride = v["patch_size"] * v["spatial_merge_size"]
    if m.get("size_multiple") not in (None, stride):
        raise Violation("size_multiple", m["size_multiple"],
                        f"{stride} (vision.patch_size {v['patch_size']} x spatial_merge_size "
                        f"{v['spatial_merge_size']})")


RULES = (_token_ids_in_vocabulary, _grid_fits_the_patches)
