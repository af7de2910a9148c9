"""Accuracy drift of a bundle against its FP32 reference over the 8 dihedral views of each board.

    PYTHONPATH=. python benchmarks/dihedral_drift.py bundles/x86-cpu \\
        --data ../shared/data/deeppcb --list pcbedge/data/splits/deeppcb_val.txt \\
        --out runs/dihedral.json

`pcbedge bench` scores one view per board; on 200 boards with ~4 hallucinated defects a rise
of one is below what one view can tell from noise. Here every board is also answered rotated by
90/180/270 degrees and mirrored (test and template alike), the describe-all answer's boxes are
mapped back to the original frame and scored against the original annotations: 8x the board
views for the same boards, no new data. Prints per view and in total, for the bundle and the
reference (default: the FP32 export its manifest names): hallucinated defects, mAP, count exact
match. This is the measurement behind the score bias correction (docs/build.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pcbedge.api import load_runner
from pcbedge.benchmarks import workload as wl
from pcbedge.benchmarks.accuracy import score_detections
from pcbedge.data.preprocess import read_gray
from pcbedge.bundle.manifest import read_manifest

VIEWS = [(k, flip) for k in range(4) for flip in (False, True)]


def to_view(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """The view: rotate by k x 90 degrees counter-clockwise (np.rot90), then mirror left-right."""
    v = np.rot90(img, k)
    return np.ascontiguousarray(v[:, ::-1] if flip else v)


def box_to_original(box, k: int, flip: bool, h: int, w: int) -> list[float]:
    """A box (x1, y1, x2, y2) found on ``to_view(img, k, flip)`` of an h x w image, in the
    original image's pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    vh, vw = (h, w) if k % 2 == 0 else (w, h)
    if flip:
        x1, x2 = vw - x2, vw - x1
    for _ in range(k % 4):   # undo one counter-clockwise quarter turn of a vh x vw view
        x1, y1, x2, y2 = vh - y2, x1, vh - y1, x2
        vh, vw = vw, vh
    return [x1, y1, x2, y2]


def run_views(bundle: Path, workload) -> list[dict]:
    runner = load_runner(bundle)
    gts = [wl.board_ground_truth(b) for b in workload.boards]
    rows = []
    for k, flip in VIEWS:
        answers = wl.answer_boards(runner, workload, describe_only=True, progress=False,
                                   degrade=lambda t, m: (to_view(t, k, flip), to_view(m, k, flip)))
        preds = []
        for board, ans in zip(workload.boards, answers):
            h, w = read_gray(board.test_path).shape
            preds.append([{"type": d["type"], "confidence": d["confidence"],
                           "bbox": box_to_original(d["bbox"], k, flip, h, w)}
                          for d in ans[0].get("defects", [])])
        s = score_detections(gts, preds)
        rows.append({"rot90": k, "mirror": flip, "deeppcb_map": s["deeppcb_map"],
                     "count_exact_match": s["count_exact_match"],
                     "n_hallucinated": s["n_hallucinated"], "n_predicted": s["n_predicted"]})
        print(f"{bundle.name:14s} rot {90 * k:3d} mirror {int(flip)}: mAP {s['deeppcb_map']:.4f}"
              f"  count {s['count_exact_match']:.3f}  hallucinated {s['n_hallucinated']}"
              f" of {s['n_predicted']}", file=sys.stderr, flush=True)
    return rows


def total(rows: list[dict]) -> dict:
    return {"n_hallucinated": sum(r["n_hallucinated"] for r in rows),
            "n_predicted": sum(r["n_predicted"] for r in rows),
            "mean_map": float(np.mean([r["deeppcb_map"] for r in rows])),
            "mean_count_exact_match": float(np.mean([r["count_exact_match"] for r in rows]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--reference", type=Path, default=None,
                   help="FP32 bundle (default: the export the bundle's manifest names)")
    p.add_argument("--data", default=None)
    p.add_argument("--list", dest="list_file", default=None)
    p.add_argument("--boards", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bundles/dihedral_drift.json"))
    a = p.parse_args(argv)
    ref = a.reference or Path(read_manifest(a.bundle)["reference"]["export_dir"])
    work = wl.load_workload(a.data, a.list_file, a.boards)
    result = {}
    for name, path in (("bundle", a.bundle), ("reference", ref)):
        rows = run_views(path, work)
        result[name] = {"path": str(path), "views": rows, "total": total(rows)}
    b, r = result["bundle"]["total"], result["reference"]["total"]
    ups = sum(x["n_hallucinated"] > y["n_hallucinated"]
              for x, y in zip(result["bundle"]["views"], result["reference"]["views"]))
    downs = sum(x["n_hallucinated"] < y["n_hallucinated"]
                for x, y in zip(result["bundle"]["views"], result["reference"]["views"]))
    result["summary"] = {"boards": len(work.boards), "views": len(VIEWS),
                         "hallucinated_bundle": b["n_hallucinated"],
                         "hallucinated_reference": r["n_hallucinated"],
                         "views_with_more": ups, "views_with_fewer": downs}
    print(json.dumps(result["summary"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
