"""What the vision head alone can count: the ceiling under every decode-time setting (issue 17).

    python benchmarks/head_ceiling.py MODEL_DIR [MODEL_DIR ...]
        [--list pcbedge/data/splits/deeppcb_val.txt] [--data ../shared/data/deeppcb] [--json OUT]

Each board goes through the vision graph once (PyTorch, FP32, the shared preprocessing); its
proposals (boxes, class-max scores, types) are then thresholded without the decoder:

- class-agnostic DeepPCB AP (IoU > 0.33) of the proposals ranked by score;
- board count exact match at the best single score threshold (0.05-0.95 in steps of 0.025),
  after suppressing a proposal that overlaps a kept one by IoU > 0.5 -- the decoder's evidence
  vote and overlap rule cannot count better than the head lets them, so this is the ceiling a
  setting search works under (in-sample: the threshold is chosen on the same boards);
- the same per board group, at that threshold, to show where the misses live.

Used to compare weights (e.g. stage A with and without hard-defect sampling) without a decoder
retrained for each.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from pcbedge.benchmarks import metrics as M
from pcbedge.data.deeppcb import read_list
from pcbedge.geometry import overlap_matrix
from pcbedge.families.pcbvlm.model.model import PcbVlm
from pcbedge.families.pcbvlm.model.train import Board8, _to_input

THRESHOLDS = np.arange(0.05, 0.95, 0.025)


def proposals(model_dir: str, boards) -> list[tuple[np.ndarray, np.ndarray]]:
    m = PcbVlm.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for b in boards:
            enc = m.encode_image(torch.from_numpy(_to_input(Board8(b, m.cfg.input_size).img))
                                 .unsqueeze(0))
            out.append((enc["region_boxes"][0].numpy(), enc["region_scores"][0].numpy()))
    return out


def kept(boxes: np.ndarray, scores: np.ndarray, t: float, overlap: float = 0.5) -> list[int]:
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= t]
    if not order:
        return []
    ov = overlap_matrix(boxes[order], boxes[order], "iou")
    keep: list[int] = []
    for a in range(len(order)):
        if all(ov[a, k] <= overlap for k in keep):
            keep.append(a)
    return [order[a] for a in keep]


def ceiling(boards, props) -> dict:
    gts = [[{"type": "open", "bbox": list(d.bbox)} for d in b.defects] for b in boards]
    ranked = [[{"type": "open", "bbox": bx[i].tolist(), "confidence": float(sc[i])}
               for i in range(len(sc))] for bx, sc in props]
    counts = [np.array([len(kept(bx, sc, t)) for t in THRESHOLDS]) for bx, sc in props]
    right = np.array([c == len(g) for c, g in zip(counts, gts)])       # boards x thresholds
    k = int(np.argmax(right.mean(0)))
    groups = defaultdict(list)
    for b, ok in zip(boards, right[:, k]):
        groups[b.group].append(bool(ok))
    return {"boards": len(boards), "ap_agnostic": M.deeppcb_ap(gts, ranked)["ap"],
            "best_count_exact": float(right[:, k].mean()), "threshold": float(THRESHOLDS[k]),
            "by_group": {g: round(float(np.mean(v)), 3) for g, v in sorted(groups.items())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    root = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", default=str(root.parent / "shared/data/deeppcb"))
    ap.add_argument("--list", type=Path, default=root / "pcbedge/data/splits/deeppcb_val.txt")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    boards = read_list(a.data, a.list)
    res = {}
    for m in a.models:
        res[m] = r = ceiling(boards, proposals(m, boards))
        print(f"{m} on {a.list.name} ({r['boards']} boards): agnostic AP {r['ap_agnostic']:.4f}, "
              f"best count {r['best_count_exact']:.3f} at {r['threshold']:.3f}; "
              + ", ".join(f"{g} {v:.3f}" for g, v in r["by_group"].items()), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
