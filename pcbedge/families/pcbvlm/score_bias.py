"""Detection-score bias correction of an INT8 vision graph against its FP32 original.

INT8 rounding noise is zero-mean per activation, but a proposal's score is the *peak* of a noisy
heatmap, and the peak of noisy values is biased upwards. Measured on the reference model
(docs/build.md): on 200 train-side boards the INT8 graph scored the FP32 graph's proposals
+0.018 logit higher on average, +0.045 below score 0.5, +0.008 above; over the 8 dihedral views
of the 200 validation boards that put 53 hallucinated defects in the answers against FP32's 44.

The correction is label-free: on boards the quantizer did *not* calibrate on, each FP32
proposal whose score lies in the decision band (one logit either side of the point where the
model's report-or-stop vote is neutral) is matched to the INT8 proposal of highest IoU
(>= 0.5), and the mean logit difference is subtracted from the bias of the float conv that
produces the heatmap logits. That conv is float by construction (narrow head outputs stay float,
:data:`pcbedge.recipes.quantize.DEFAULT_MIN_CONV_CHANNELS`), so the change is exact: every
heatmap logit moves by the same constant, peaks and ranks stay where they were.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pcbedge.geometry import iou_matrix
from pcbedge.errors import ExportError

MATCH_IOU = 0.5
BAND_LOGITS = 1.0       # the band: decision centre +- 1 logit (0.4 -> scores 0.15 .. 0.65)
MIN_MATCHES = 30        # fewer matched proposals than this: no correction, said so


def decision_band(center: float = 0.5, half_width: float = BAND_LOGITS) -> tuple[float, float]:
    """(low, high) scores one ``half_width`` logit either side of ``center``."""
    c = math.log(center / (1.0 - center))
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    return sig(c - half_width), sig(c + half_width)


def dihedral_views(feeds: Iterable[dict]) -> Iterator[dict]:
    """Each feed's 8 rotations / mirror images (square inputs): 8x the proposals per board."""
    for feed in feeds:
        x = feed["pixel_values"]
        for k in range(4):
            r = np.rot90(x, k, axes=(2, 3))
            yield {"pixel_values": np.ascontiguousarray(r)}
            yield {"pixel_values": np.ascontiguousarray(r[..., ::-1])}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def estimate_score_bias(reference: str | Path, quantized: str | Path, feeds: Iterable[dict],
                        band: tuple[float, float]) -> dict:
    """Mean INT8-minus-FP32 logit of the FP32 proposals scored within ``band`` (matched by
    IoU >= 0.5, batch item 0), its standard error and the number matched."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(reference), opts, providers=["CPUExecutionProvider"])
    qnt = ort.InferenceSession(str(quantized), opts, providers=["CPUExecutionProvider"])
    names = ["region_scores", "region_boxes"]
    diffs: list[float] = []
    views = gated = 0
    for feed in feeds:
        (rs, rb), (qs, qb) = ref.run(names, feed), qnt.run(names, feed)
        d, g = matched_logit_diffs(rs[0], rb[0], qs[0], qb[0], band)
        diffs += d
        gated += g
        views += 1
    d = np.asarray(diffs)
    return {"offset": float(d.mean()) if d.size else 0.0,
            "stderr": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None,
            "matched": int(d.size), "gated": gated, "views": views, "band": list(band)}


def matched_logit_diffs(rs, rb, qs, qb, band: tuple[float, float]) -> tuple[list[float], int]:
    """One view: INT8-minus-FP32 logits of the FP32 proposals scored within ``band`` and matched
    (IoU >= MATCH_IOU) by an INT8 proposal, and how many matches were left out because the INT8
    graph scored them exactly 0. A score of exactly 0 is an in-graph rule's verdict (the
    template-consistency check, the island rule), not the heatmap's: a box moved a pixel by
    INT8 can fall on the other side of such a rule, and one such logit (-inf, clipped) would
    swamp the mean the correction is after."""
    lo, hi = band
    live = np.flatnonzero((rs >= lo) & (rs <= hi))
    if not live.size:
        return [], 0
    iou = iou_matrix(rb[live], qb)
    best = iou.argmax(1)
    near = iou[np.arange(live.size), best] >= MATCH_IOU
    kept = near & (qs[best] > 0)
    return list((_logit(qs[best]) - _logit(rs[live]))[kept]), int((near & ~kept).sum())


def heat_logit_conv(model):
    """The float Conv whose output feeds a Sigmoid directly (the heatmap logits), with a bias
    initializer; ExportError unless there is exactly one."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name for t in model.graph.initializer}
    found = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3
             and n.input[2] in inits
             and any(c.op_type == "Sigmoid" for c in consumers.get(n.output[0], []))]
    if len(found) != 1:
        raise ExportError(f"score bias correction needs one float Conv feeding a Sigmoid "
                          f"(the heatmap logits); the vision graph has {len(found)}",
                          fix="set [quantization] score_bias_boards = 0 for this model")
    return found[0]


def fold_score_offset(path: str | Path, offset: float) -> str:
    """Subtract ``offset`` from the heatmap-logit conv's bias in the graph at ``path`` (in
    place); returns the conv's name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    conv = heat_logit_conv(model)
    for t in model.graph.initializer:
        if t.name == conv.input[2]:
            bias = numpy_helper.to_array(t).astype(np.float32) - np.float32(offset)
            t.CopyFrom(numpy_helper.from_array(bias, t.name))
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)   # a new file: never written through a link into the export
    return conv.name
