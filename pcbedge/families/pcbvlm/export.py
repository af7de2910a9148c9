"""Export side of the reference PCB VLM: its three graphs, their PyTorch references and the
family's manifest fields (torch; imported by the family on demand)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from pcbedge.data.preprocess import RECIPE
from pcbedge.export.graphs import GraphExport, TensorSpec

SIZE_MULTIPLE = 32
# the vision output that scores the visual tokens for each pruning method (the manifest's
# token_scores)
SCORE_OUTPUTS = {"model_prior": "token_prior", "template_diff": "token_diff"}
VISION_OUTPUTS = ("visual_tokens", "region_tokens", "region_boxes", "region_scores",
                  "token_prior", "token_diff")


class VisionGraph(nn.Module):
    """Vision encoder + projector in one graph."""

    def __init__(self, model):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector

    def forward(self, pixel_values):
        c32, boxes, scores, raw, prior, diff = self.vision(pixel_values)
        vis, reg = self.projector(c32, raw)
        return vis, reg, boxes, scores, prior, diff


class PrefillGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, visual_tokens, region_tokens, input_ids):
        return self.decoder.prefill(visual_tokens, region_tokens, input_ids)


class StepGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, input_ids, positions, region_tokens, past):
        return self.decoder.step(input_ids, positions, region_tokens, past)


def load_model(model_dir: Path, family=None):
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    return PcbVlm.from_pretrained(model_dir).eval()


def default_input_size(model) -> int:
    return int(model.cfg.input_size)

def graphs(model, input_size: int) -> list[GraphExport]:
    c, t = model.cfg, model.cfg.text
    K, D, L, H = c.vision.num_regions, t.d_model, t.n_layers, t.n_heads
    hd = D // H
    logits_w = t.vocab_size  # text vocabulary + K pointer logits
    g = torch.Generator().manual_seed(0)
    B, T = 2, 5                       # batch 2: torch.export specialises size-1 axes
    n = (input_size // c.vision.token_stride) ** 2
    batch = Dim("batch", min=1, max=1024)
    h32, w32 = Dim("h32", min=2, max=512), Dim("w32", min=2, max=512)
    n_vis, seq = Dim("n_vis", min=1, max=1 << 18), Dim("seq", min=1, max=t.max_text_len)
    past_seq = Dim("past_seq", min=2, max=1 << 18)
    pixels = torch.rand(B, 3, input_size, input_size, generator=g)
    vis = torch.randn(B, n, D, generator=g)
    reg = torch.randn(B, K, D, generator=g)
    ids = torch.randint(0, t.vocab_size, (B, T), generator=g)
    with torch.no_grad():
        _, past = model.decoder.prefill(vis, reg, ids)
    f32, i64 = "float32", "int64"
    kv_in = TensorSpec("past", f32, (L, 2, "batch", H, "past_seq", hd))
    return [
        GraphExport(
            "vision", "vision.onnx", VisionGraph(model).eval(), (pixels,),
            inputs=(TensorSpec("pixel_values", f32, ("batch", 3, "height", "width")),),
            outputs=(TensorSpec("visual_tokens", f32, ("batch", "n_vis", D)),
                     TensorSpec("region_tokens", f32, ("batch", K, D)),
                     TensorSpec("region_boxes", f32, ("batch", K, 4)),
                     TensorSpec("region_scores", f32, ("batch", K)),
                     TensorSpec("token_prior", f32, ("batch", "n_vis")),
                     TensorSpec("token_diff", f32, ("batch", "n_vis"))),
            dynamic_shapes={"pixel_values": {0: batch, 2: SIZE_MULTIPLE * h32,
                                             3: SIZE_MULTIPLE * w32}}),
        GraphExport(
            "decoder_prefill", "decoder_prefill.onnx", PrefillGraph(model).eval(),
            (vis, reg, ids),
            inputs=(TensorSpec("visual_tokens", f32, ("batch", "n_vis", D)),
                    TensorSpec("region_tokens", f32, ("batch", K, D)),
                    TensorSpec("input_ids", i64, ("batch", "seq"))),
            outputs=(TensorSpec("logits", f32, ("batch", logits_w)),
                     TensorSpec("present", f32, (L, 2, "batch", H, "past_seq", hd))),
            dynamic_shapes={"visual_tokens": {0: batch, 1: n_vis}, "region_tokens": {0: batch},
                            "input_ids": {0: batch, 1: seq}}),
        GraphExport(
            "decoder_step", "decoder_step.onnx", StepGraph(model).eval(),
            (ids[:, :1].clone(), torch.full((B, 1), T), reg, past),
            inputs=(TensorSpec("input_ids", i64, ("batch", 1)),
                    TensorSpec("positions", i64, ("batch", 1)),
                    TensorSpec("region_tokens", f32, ("batch", K, D)), kv_in),
            outputs=(TensorSpec("logits", f32, ("batch", logits_w)),
                     TensorSpec("present", f32, (L, 2, "batch", H, "past_seq + 1", hd))),
            dynamic_shapes={"input_ids": {0: batch}, "positions": {0: batch},
                            "region_tokens": {0: batch}, "past": {2: batch, 4: past_seq}}),
    ]


@torch.no_grad()
def reference(model, graph: str, feeds: dict) -> dict:
    tt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    if graph == "vision":
        enc = model.encode_image(tt["pixel_values"])
        return {k: enc[k].numpy() for k in VISION_OUTPUTS}
    if graph == "decoder_prefill":
        logits, kv = model.decoder.prefill(tt["visual_tokens"], tt["region_tokens"],
                                           tt["input_ids"])
    else:
        logits, kv = model.decoder.step(tt["input_ids"], tt["positions"],
                                        tt["region_tokens"], tt["past"])
    return {"logits": logits.numpy(), "present": kv.numpy()}

def manifest_extras(model, input_size: int) -> dict:
    c, t = model.cfg, model.cfg.text
    spec = model.spec
    return {
        "kv_cache": {
            "input": "past", "output": "present",
            "layout": ["layer", "kv", "batch", "head", "seq", "head_dim"],
            "kv": ["key", "value"], "num_layers": t.n_layers, "num_heads": t.n_heads,
            "head_dim": t.d_model // t.n_heads, "dtype": "float32",
            "sequence": ["visual_tokens", "region_tokens", "text"],
            "position_input": "positions", "max_positions": t.max_text_len,
        },
        "visual_tokens": (input_size // c.vision.token_stride) ** 2,
        "visual_token_stride": c.vision.token_stride,
        "token_scores": dict(SCORE_OUTPUTS),
        "num_regions": c.vision.num_regions,
        "input_size": input_size,
        "size_multiple": SIZE_MULTIPLE,
        "vocab": {"text": t.text_vocab, "regions": c.vision.num_regions,
                  "logits": t.vocab_size},
        "preprocess": {"function": "pcbedge.data.preprocess.load_pair", **RECIPE,
                       "input_size": input_size},
        "tokenizer": "tokenizer.json",
        "max_question_tokens": t.max_text_len // 2,
        "max_text_len": t.max_text_len,
        "answer": {"parser": spec["kind"], "grammar": spec},
        "precision": {"vision": "fp32", "decoder": "fp32"},
    }
