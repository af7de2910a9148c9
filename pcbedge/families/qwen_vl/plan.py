"""The graph calls of one typical answer of a Qwen2-VL / Qwen2.5-VL bundle, for ``pcbedge plan``.

One answer (runner.py): the vision graph once per image (board, and template when given: each
call attends over its own patches), the embed graph and the decoder over the whole prompt
(pruned visual tokens dropped), then per generated token the embed graph and the decoder with
one token and the growing KV cache. Typical sizes (overridable, e.g. ``--new-tokens``): two
images, 40 text tokens of chat template and question, 16 generated tokens (the length the
2B-class measurements use, docs/plan.md); ``visual_tokens`` per image defaults to the
bundle's.
"""
from __future__ import annotations

import numpy as np

from pcbedge.plan import Call
from pcbedge.runtime.pruning import TokenPruningConfig, token_budget

TYPICAL = {"images": 2, "text_tokens": 40, "new_tokens": 16}


def plan_calls(manifest: dict, typical: dict) -> tuple[list[Call], dict]:
    from pcbedge.families.qwen_vl.preprocess import window_index

    t = {**TYPICAL, **typical}
    v = manifest["vision"]
    merge, patch = int(v["spatial_merge_size"]), int(v["patch_size"])
    # per image, after the merger: the bundle's, or a typical image of another size (the
    # vision graph's patch axis is dynamic)
    n_tok = int(t.get("visual_tokens") or manifest["visual_tokens"])
    side = int(round(np.sqrt(n_tok))) * merge          # patches per side (square input)
    grid = np.array([[1, side, side]], np.int64)
    vdims = {"n_patches": n_tok * merge * merge, "n_images_1": 2, "n_tokens": n_tok}
    if v.get("windowed"):
        vdims["n_windows_1"] = len(window_index(grid, int(v["window_size"]), patch, merge)[1])
    pruning = manifest.get("pruning") or {}
    cfg = TokenPruningConfig(**pruning) if pruning else TokenPruningConfig(method="none")
    if "keep_ratio" in typical and cfg.enabled:
        cfg = TokenPruningConfig(method=cfg.method, keep_ratio=float(typical["keep_ratio"]),
                                 min_tokens=cfg.min_tokens)
    images, text, new = int(t["images"]), int(t["text_tokens"]), int(t["new_tokens"])
    prompt = text + images * n_tok
    kept = text + images * token_budget(n_tok, cfg)
    calls = [
        Call("vision", "vision", vdims, count=images, what="per image"),
        Call("prefill", "embed", {"batch": 1, "seq": prompt}, what="prompt ids"),
        Call("prefill", "decoder", {"batch": 1, "seq": kept, "past_seq": 0}, what="prompt"),
        Call("decode", "embed", {"batch": 1, "seq": 1}, count=new, what="per token"),
        Call("decode", "decoder", {"batch": 1, "seq": 1, "past_seq": kept + (new - 1) // 2},
             count=new, what="per token, mean past"),
    ]
    info = {"images": images, "visual_tokens_per_image": n_tok,
            "visual_tokens_kept": kept - text, "text_tokens": text, "prompt_tokens": kept,
            "decode_tokens": new, "kv_positions": kept + new,
            "source": "typical sizes of docs/plan.md (overridable)"}
    return calls, info
