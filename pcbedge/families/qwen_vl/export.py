"""Export side of Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``).

Three graphs: ``vision`` (patch embedding, vision blocks, patch merger), ``embed`` (token ids ->
embeddings) and ``decoder`` (the language model with its KV cache, one graph for prefill and
steps). The host side (image patches, rotary tables, window order, multimodal positions, prompt,
greedy loop) runs in numpy in :mod:`pcbedge.families.qwen_vl.runner`.

Tracing patch: the vision attention splits its input per image with ``cu_seqlens.tolist()``,
which torch.export cannot trace. :class:`VisionGraph` recomputes the tower's forward with the
same weights and attention as one block-diagonal additive mask built from ``cu_seqlens`` (and,
for Qwen2.5-VL, from the window segments), so every image (window) only sees itself.
transformers is not modified.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.errors import ModelError
from pcbedge.export.graphs import GraphExport, TensorSpec
from pcbedge.families.qwen_vl import preprocess as qp

PARSER = "qwen-vl-grounding-v1"
DEFAULT_SIDE = 448            # the square side of the manifest's visual-token count
MAX_QUESTION_TOKENS = 512
CHAT_TEMPLATE_FILE = "chat_template.jinja"   # the checkpoint's template, shipped in the bundle


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def block_mask(cu: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """Additive [n, n] mask of ``dtype`` (the tower's float type): 0 inside a segment of ``cu``
    (cumulative lengths from 0), that type's most negative number across segments."""
    # cu[0] == 0 <= every position; no cu[1:] slice: its length could be 1, and torch.export
    # would then specialise the segment count (one image or one window is the common case)
    k = cu.shape[0]
    pos = torch.arange(n, device=cu.device)[:, None].expand(n, k)
    seg = (pos >= cu[None, :].expand(n, k)).sum(-1)
    same = seg[:, None] == seg[None, :]
    zero = torch.zeros((), dtype=dtype, device=cu.device)
    return torch.where(same, zero, torch.finfo(dtype).min)


def masked_attention(attn, x, cos, sin, mask):
    """The vision attention of transformers with one additive mask instead of a per-image loop."""
    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))                 # [heads, n, hd]
    w = torch.softmax(q @ k.transpose(1, 2) * attn.scaling + mask, dim=-1)
    return attn.proj((w @ v).transpose(0, 1).reshape(n, -1))


class VisionGraph(nn.Module):
    """The vision tower + merger, attention masked per image (and per window in 2.5-VL)."""

    def __init__(self, visual, windowed: bool):
        super().__init__()
        self.visual, self.windowed = visual, windowed
        self.full = set(getattr(visual, "fullatt_block_indexes", None) or ())
        self.unit = visual.spatial_merge_size ** 2

    def forward(self, pixel_values, rotary, cu_seqlens, window_index=None, window_reverse=None,
                cu_window_seqlens=None):
        v = self.visual
        h = v.patch_embed(pixel_values)
        n = h.shape[0]
        if self.windowed:   # group patches window by window, as get_window_index orders them
            h = h.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)
            rotary = rotary.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)
        emb = torch.cat((rotary, rotary), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        full = block_mask(cu_seqlens, n, h.dtype)
        local = block_mask(cu_window_seqlens, n, h.dtype) if self.windowed else full
        for i, blk in enumerate(v.blocks):
            mask = full if (not self.windowed or i in self.full) else local
            h = h + masked_attention(blk.attn, blk.norm1(h), cos, sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        h = v.merger(h)
        return h[window_reverse] if self.windowed else h


class EmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class DecoderGraph(nn.Module):
    """Language model + head over one stacked cache ``[layer, kv, batch, kv_head, seq, hd]``;
    returns the last position's logits and the whole new cache."""

    def __init__(self, model):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head
        self.layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, position_ids, past):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[i, 0], past[i, 1], i)
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1])
        present = torch.stack([torch.stack([cache.layers[i].keys, cache.layers[i].values])
                               for i in range(self.layers)])
        return logits, present


def vision_feeds(model, grids: list) -> dict:
    """Numpy host-side inputs of the vision graph for images of ``grids`` (besides pixels)."""
    vc = model.config.vision_config
    g = np.asarray(grids, np.int64).reshape(-1, 3)
    head_dim = _vision_dim(vc) // vc.num_heads
    feeds = {"rotary": qp.vision_rotary(g, head_dim, vc.spatial_merge_size),
             "cu_seqlens": qp.cu_seqlens(g)}
    if _windowed(model):
        idx, cu_win = qp.window_index(g, vc.window_size, vc.patch_size, vc.spatial_merge_size)
        feeds.update(window_index=idx, window_reverse=np.argsort(idx).astype(np.int64),
                     cu_window_seqlens=cu_win)
    return feeds


def _vision_dim(vc) -> int:
    return int(getattr(vc, "embed_dim", None) or vc.hidden_size)


def _windowed(model) -> bool:
    # Qwen2.5-VL's window attention (config.model_type is not reliable after from_pretrained:
    # it reads through to the text config)
    return getattr(model.config.vision_config, "fullatt_block_indexes", None) is not None


F32, I64 = "float32", "int64"
# preprocessor settings the numpy preprocessing reproduces (anything else is refused at export)
SUPPORTED_PREPROCESS = {"do_resize": True, "do_rescale": True, "do_normalize": True,
                        "do_convert_rgb": True, "resample": 3}


def read_recipe(path: Path) -> qp.ImageRecipe:
    """The checkpoint's preprocessor config; ModelError for settings the runner cannot
    reproduce (another resampling filter, resizing or normalisation switched off)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}",
                         fix="copy the preprocessor_config.json of the base model") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} holds no JSON object",
                         fix="copy the preprocessor_config.json of the base model")
    bad = {k: cfg[k] for k, v in SUPPORTED_PREPROCESS.items() if k in cfg and cfg[k] != v}
    if bad:
        raise ModelError(f"{path} sets {bad}, which pcbedge's numpy preprocessing does not "
                         "reproduce", fix=f"use the Qwen defaults {SUPPORTED_PREPROCESS}")
    return qp.ImageRecipe.from_config(cfg)


def vision_export(model, gen) -> GraphExport:
    """The vision graph, traced on two images (so the segment masks are exercised)."""
    vc, tc, r = model.config.vision_config, model.config.text_config, model.pcbedge_recipe
    grids = [(1, 8, 12), (1, 4, 4)]
    n = sum(t * h * w for t, h, w in grids)
    d_in = vc.in_channels * r.temporal_patch_size * r.patch_size ** 2
    feeds = {k: torch.from_numpy(v) for k, v in vision_feeds(model, grids).items()}
    units = Dim("n_units", min=1, max=1 << 16)    # merged tokens: patches come in fours
    specs = [TensorSpec("pixel_values", F32, ("n_patches", d_in)),
             TensorSpec("rotary", F32, ("n_patches", _vision_dim(vc) // vc.num_heads // 2)),
             TensorSpec("cu_seqlens", I64, ("n_images_1",))]
    dyn = {"pixel_values": {0: 4 * units}, "rotary": {0: 4 * units},
           "cu_seqlens": {0: Dim("n_images_1", min=2, max=1024)}}
    windowed = _windowed(model)
    if windowed:
        specs += [TensorSpec("window_index", I64, ("n_tokens",)),
                  TensorSpec("window_reverse", I64, ("n_tokens",)),
                  TensorSpec("cu_window_seqlens", I64, ("n_windows_1",))]
        dyn.update(window_index={0: units}, window_reverse={0: units},
                   cu_window_seqlens={0: Dim("n_windows_1", min=2, max=1 << 16)})
    names = [t.name for t in specs]
    args = (torch.randn(n, d_in, generator=gen), *[feeds[k] for k in names[1:]])
    return GraphExport("vision", "vision.onnx", VisionGraph(model.model.visual, windowed).eval(),
                       args, inputs=tuple(specs),
                       outputs=(TensorSpec("image_embeds", F32, ("n_tokens", tc.hidden_size)),),
                       dynamic_shapes={k: dyn[k] for k in names})


def text_exports(model, gen) -> list[GraphExport]:
    """The embedding and the cached decoder (one graph for prefill and steps)."""
    tc = model.config.text_config
    L, kvh, D = tc.num_hidden_layers, tc.num_key_value_heads, tc.hidden_size
    hd = D // tc.num_attention_heads
    B, T, P = 2, 5, 3                       # batch 2: torch.export specialises size-1 axes
    batch = Dim("batch", min=1, max=64)
    seq, past_seq = Dim("seq", min=1, max=1 << 15), Dim("past_seq", min=0, max=1 << 15)
    embeds = torch.randn(B, T, D, generator=gen)
    pos = torch.arange(P, P + T).view(1, 1, T).expand(3, B, T).contiguous()
    past = torch.randn(L, 2, B, kvh, P, hd, generator=gen)
    ids = torch.randint(0, tc.vocab_size, (B, T), generator=gen)
    return [
        GraphExport("embed", "embed.onnx", EmbedGraph(model).eval(), (ids,),
                    inputs=(TensorSpec("input_ids", I64, ("batch", "seq")),),
                    outputs=(TensorSpec("inputs_embeds", F32, ("batch", "seq", D)),),
                    dynamic_shapes={"input_ids": {0: batch, 1: seq}}),
        GraphExport("decoder", "decoder.onnx", DecoderGraph(model).eval(), (embeds, pos, past),
                    inputs=(TensorSpec("inputs_embeds", F32, ("batch", "seq", D)),
                            TensorSpec("position_ids", I64, (3, "batch", "seq")),
                            TensorSpec("past", F32, (L, 2, "batch", kvh, "past_seq", hd))),
                    outputs=(TensorSpec("logits", F32, ("batch", tc.vocab_size)),
                             TensorSpec("present", F32,
                                        (L, 2, "batch", kvh, "past_seq + seq", hd))),
                    dynamic_shapes={"inputs_embeds": {0: batch, 1: seq},
                                    "position_ids": {1: batch, 2: seq},
                                    "past": {2: batch, 4: past_seq}}),
    ]


def load_model(model_dir: Path, family, dtype=None):
    """The transformers model in eval mode (``dtype``, default float32), with the checkpoint's
    image recipe and chat template attached (``pcbedge_recipe``, ``pcbedge_chat_template``)."""
    import transformers

    from pcbedge.runtime.chat_template import find_chat_template
    found = find_chat_template(model_dir)
    if found is None:
        raise ModelError(f"{model_dir} has no chat template (chat_template.jinja, "
                         "chat_template.json or tokenizer_config.json's chat_template)",
                         fix="copy the chat template the model was fine-tuned with into the "
                             "checkpoint folder (transformers' save_pretrained writes "
                             "chat_template.jinja)")
    cls = getattr(transformers, family.model_class)
    model = cls.from_pretrained(model_dir, dtype=dtype or torch.float32,
                                attn_implementation="eager").eval()
    model.pcbedge_recipe = read_recipe(model_dir / "preprocessor_config.json")
    model.pcbedge_chat_template = found
    model.pcbedge_special_tokens = _special_tokens(model_dir)
    return model


def _special_tokens(model_dir: Path) -> dict:
    """The string special tokens of tokenizer_config.json (transformers passes them to the
    chat template as variables: bos_token, eos_token, ...)."""
    path = model_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    keys = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
            "mask_token")
    return {k: cfg[k] for k in keys if isinstance(cfg.get(k), str)} if isinstance(cfg, dict) \
        else {}


def bundle_files(model) -> dict[str, str]:
    """The checkpoint's own chat template, shipped in the bundle (``assets.chat_template``)."""
    return {CHAT_TEMPLATE_FILE: model.pcbedge_chat_template[0]}


def default_input_size(model) -> int:
    r = model.pcbedge_recipe
    f = r.patch_size * r.merge_size
    return min(DEFAULT_SIDE, int(np.sqrt(r.max_pixels)) // f * f)


def graphs(model, input_size: int) -> list[GraphExport]:
    """The decoder first and the small embedding last: torch's dynamo exporter keeps the last
    graph it exported alive (with the parameters it captured) past the export, so the graph
    left behind for the parity phase should be the smallest (docs/real-size.md)."""
    gen = torch.Generator().manual_seed(0)
    vision = vision_export(model, gen)
    embed, decoder = text_exports(model, gen)
    return [decoder, vision, embed]


@torch.no_grad()
def reference(model, graph: str, feeds: dict) -> dict:
    """PyTorch's own code path (not the tracing patch) for each graph."""
    tt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    if graph == "vision":
        grid = torch.from_numpy(np.asarray(feeds["grid_thw"], np.int64).reshape(-1, 3))
        return {"image_embeds": model.model.visual(tt["pixel_values"], grid_thw=grid).numpy()}
    if graph == "embed":
        return {"inputs_embeds": model.get_input_embeddings()(tt["input_ids"]).numpy()}
    logits, present = DecoderGraph(model)(tt["inputs_embeds"], tt["position_ids"], tt["past"])
    return {"logits": logits.numpy(), "present": present.numpy()}


@torch.no_grad()
def generate_reference(model, input_ids: list[int], images, max_new_tokens: int = 32) -> list[int]:
    """transformers' greedy ``generate`` on prepared prompt ids and images (the runner's
    :class:`pcbedge.families.qwen_vl.runner.Images`)."""
    ids = torch.from_numpy(np.asarray([input_ids], np.int64))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         pixel_values=torch.from_numpy(images.pixel_values),
                         image_grid_thw=torch.from_numpy(np.asarray(images.grids, np.int64)),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def manifest_extras(model, input_size: int) -> dict:
    vc, tc, cfg = model.config.vision_config, model.config.text_config, model.config
    r = model.pcbedge_recipe
    merge = vc.spatial_merge_size
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return {
        "kv_cache": {
            "input": "past", "output": "present",
            "layout": ["layer", "kv", "batch", "kv_head", "seq", "head_dim"],
            "kv": ["key", "value"], "num_layers": tc.num_hidden_layers,
            "num_heads": tc.num_key_value_heads,
            "head_dim": tc.hidden_size // tc.num_attention_heads, "dtype": "float32",
            "sequence": ["prompt (image tokens in place)", "generated"],
            "position_input": "position_ids", "position_layout": "mrope [3, batch, seq]",
            "max_positions": int(tc.max_position_embeddings),
        },
        "visual_tokens": (input_size // (r.patch_size * merge)) ** 2,
        "visual_token_stride": r.patch_size * merge,
        "size_multiple": r.patch_size * merge,
        # scores computed by the runner from the image embeddings (no extra graph output)
        "token_scores": {"template_diff": "image_embeds", "feature_norm": "image_embeds"},
        "num_regions": 0,
        "input_size": input_size,
        "vocab": {"text": int(tc.vocab_size), "regions": 0, "logits": int(tc.vocab_size)},
        "preprocess": {"function": "pcbedge.families.qwen_vl.preprocess.preprocess_image",
                       **r.to_dict()},
        "vision": {"windowed": _windowed(model), "spatial_merge_size": merge,
                   "patch_size": vc.patch_size, "num_heads": vc.num_heads,
                   "head_dim": _vision_dim(vc) // vc.num_heads,
                   "window_size": getattr(vc, "window_size", None),
                   "rotary_theta": 10000.0},
        "tokenizer": "tokenizer.json",
        "max_question_tokens": MAX_QUESTION_TOKENS,
        "max_text_len": int(tc.max_position_embeddings),
        "answer": {
            "parser": PARSER,
            "box_coordinates": "resized_pixels" if _windowed(model) else "norm1000",
            "defect_types": list(DEFECT_TYPES),
            "image_token_id": int(cfg.image_token_id),
            "eos_token_ids": [int(e) for e in eos],
            # None: the chat template decides (Qwen's default adds its own system turn)
            "system_prompt": None,
            "special_tokens": dict(model.pcbedge_special_tokens),
            "chat_template_source": model.pcbedge_chat_template[1],
        },
        "assets": {"chat_template": CHAT_TEMPLATE_FILE},
        "precision": {"vision": "fp32", "decoder": "fp32"},
    }
