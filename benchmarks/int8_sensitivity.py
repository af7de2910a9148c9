"""Per-layer INT8 sensitivity of a reference-family vision graph: which conv, kept in float, takes
the most drift off the detection scores?

    python benchmarks/int8_sensitivity.py EXPORT_DIR [--calibration-list pcbedge/data/sample/calib.txt]
        [--data ../shared/data/deeppcb] [--every 4] [--json OUT]

The graph is quantized as the x86-cpu profile does (static QDQ, u8 x u8, per channel, minmax;
onnxruntime), once with every conv in INT8 and once per conv with that conv alone kept float.
Each variant is compared with the FP32 graph on the bundled sample's 48 bench boards plus every
``--every``-th validation board: the logit difference of each FP32 proposal scored >= 0.02 to
its best-IoU INT8 proposal (mean |d| over all, and over the borderline ones, FP32 score 0.1-0.6,
where a report can flip), and the visual tokens' relative L2 error. Slow (a quantization per
conv): minutes for the reference model.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pcbedge.data.deeppcb import read_list
from pcbedge.data.preprocess import load_pair
from pcbedge.geometry import iou_matrix
from pcbedge.recipes.configs import StaticInt8Config
from pcbedge.recipes.quantize import _preprocess, narrow_convs, quantize_graph

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pcbedge/data/sample"


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def drift(refs, feeds, graph: Path) -> dict:
    q = ort.InferenceSession(str(graph), _opts())
    names = [o.name for o in q.get_outputs()]
    d_all, d_border, vis = [], [], []
    for x, r in zip(feeds, refs):
        s = dict(zip(names, q.run(None, x)))
        vis.append(np.linalg.norm(s["visual_tokens"] - r["visual_tokens"])
                   / np.linalg.norm(r["visual_tokens"]))
        rs, rb, qs, qb = (r["region_scores"][0], r["region_boxes"][0], s["region_scores"][0],
                          s["region_boxes"][0])
        live = np.flatnonzero(rs >= 0.02)
        if not live.size:
            continue
        iou = iou_matrix(rb[live], qb)
        best = iou.argmax(1)
        ok = iou[np.arange(live.size), best] >= 0.5
        d = (logit(qs[best]) - logit(rs[live]))[ok]
        d_all += list(d)
        d_border += list(d[(rs[live][ok] > 0.1) & (rs[live][ok] < 0.6)])
    return {"proposals": len(d_all), "mean_abs": round(float(np.abs(d_all).mean()), 4),
            "border": len(d_border), "border_mean_abs": round(float(np.abs(d_border).mean()), 4),
            "border_bias": round(float(np.mean(d_border)), 4),
            "visual_tokens_rel_l2": round(float(np.mean(vis)), 4)}


def _opts():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    return o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--calibration-list", type=Path, default=SAMPLE / "calib.txt")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/deeppcb")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    src = a.export / "vision.onnx"

    def feed(b):
        return {"pixel_values": load_pair(b.test_path, b.template_path, 640)[0][None]
                .astype(np.float32)}
    cal = [feed(b) for b in read_list(a.calibration_list.parent, a.calibration_list)]
    boards = read_list(SAMPLE, SAMPLE / "bench.txt")
    if (a.data / "trainval.txt").exists():
        boards += read_list(a.data, REPO / "pcbedge/data/splits/deeppcb_val.txt")[::a.every]
    feeds = [feed(b) for b in boards]
    ref = ort.InferenceSession(str(src), _opts())
    names = [o.name for o in ref.get_outputs()]
    refs = [dict(zip(names, ref.run(None, x))) for x in feeds]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the quantizer sees the graph after onnxruntime's pre-processing (Conv+BN folded,
        # nodes renamed): name the convs as it does
        model = onnx.load(str(_preprocess(src, Path(tmp) / "pre.onnx")), load_external_data=False)
        narrow = set(narrow_convs(model, StaticInt8Config().min_conv_channels))
        convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in narrow]
        for keep in [None] + convs:
            dst = Path(tmp) / "q.onnx"
            cfg = StaticInt8Config(op_types=("Conv", "Relu"), weight_type="uint8",
                                   nodes_to_exclude=(keep,) if keep else ())
            quantize_graph(src, dst, cfg, iter(cal))
            rows.append({"float": keep, **drift(refs, feeds, dst)})
            print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"export": str(a.export), "boards": len(boards),
                                      "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
