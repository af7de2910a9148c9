"""Validation of the reference model with the PyTorch answer loop (the model card's numbers).

The same questions and metrics as `pcbedge bench` (which measures deployed bundles): the
describe-all answer scored by DeepPCB's protocol, and per-type where / how-many / is-there-any
questions in the *held-out* phrasings the model never trained on.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from pcbedge.benchmarks import metrics as M
from pcbedge.data.deeppcb import Board
from pcbedge.data.preprocess import load_pair
from pcbedge.data.qa import QuestionGenerator


def _gt(board: Board) -> list[dict]:
    return [{"type": d.type, "bbox": list(d.bbox)} for d in board.defects]


@torch.no_grad()
def evaluate_model(model, boards: list[Board], *, split: str = "heldout", seed: int = 0) -> dict:
    gen = QuestionGenerator(seed=seed, split=split)
    gts, preds, q_records = [], [], {"where": [], "count": [], "exists": [], "intent": []}
    exist_records = []
    for b in tqdm(boards, desc=f"evaluating ({split} phrasings)", unit="board"):
        x, meta = load_pair(b.test_path, b.template_path, model.cfg.input_size)
        enc = model.encode_image(torch.from_numpy(x).unsqueeze(0))
        gt = _gt(b)
        present = {d["type"] for d in gt}
        for qa in gen.for_board_eval(present):
            ans = model.answer_encoded(enc, qa.question, meta)
            q_records["intent"].append({"truth": qa.kind, "pred": ans["intent"]})
            if qa.kind == "describe":
                gts.append(gt)
                preds.append([{k: d[k] for k in ("type", "bbox", "confidence")}
                              for d in ans["defects"]])
                continue
            g_t = [d for d in gt if d["type"] == qa.filter]
            p_t = [d for d in ans["defects"] if d["type"] == qa.filter]
            if qa.kind == "count":
                q_records["count"].append({"truth": len(g_t), "pred": ans["count"]})
            elif qa.kind == "exists":
                rec = {"truth": bool(g_t), "pred": ans["count"] > 0}
                q_records["exists"].append(rec)
                exist_records.append(rec)
            else:
                ok = len(p_t) == len(g_t) and (not g_t or M.deeppcb_ap(
                    [g_t], [[{**d, "confidence": d["confidence"]} for d in p_t]])["tp"] == len(g_t))
                q_records["where"].append({"truth": True, "pred": bool(ok)})
    flat_conf = [d["confidence"] for p in preds for d in p]
    correct = M.prediction_correctness(gts, preds)
    ece = M.expected_calibration_error(flat_conf, correct)
    return {
        "boards": len(boards), "question_split": split,
        "deeppcb_map": M.deeppcb_ap(gts, preds)["ap"],
        "deeppcb_f": M.deeppcb_ap(gts, preds)["f_score"],
        "map_05": M.deeppcb_ap(gts, preds, iou_thr=0.5)["ap"],
        "per_type_ap_033": M.per_type_ap(gts, preds, 0.33),
        "per_type_ap_05": M.per_type_ap(gts, preds, 0.5),
        "count_exact_match": M.count_exact_match(gts, preds),
        "hallucination_rate": M.hallucination_rate(gts, preds)["rate"],
        "median_center_error_px": M.median_center_error(gts, preds),
        "ece": ece["ece"], "ece_bins": ece["bins"],
        "question_accuracy": {k: M.accuracy(v) for k, v in q_records.items()},
        "existence": M.existence_f1(exist_records),
        "n_pred": sum(len(p) for p in preds), "n_gt": sum(len(g) for g in gts),
    }
