"""Accuracy of a bench run: answers scored against the DeepPCB annotations, drift against a
reference run of the same questions, and accuracy under image degradations.

Detection figures come from the describe-all answer of each board (its defect list is the
board's prediction set); question figures from the typed where / count / exists questions.
Answers and annotations are both in original-image pixels. Definitions: docs/bench.md.
"""
from __future__ import annotations

import math

import numpy as np

from pcbedge.benchmarks import metrics
from pcbedge.benchmarks.workload import (Workload, answer_boards, board_ground_truth,
                                         board_size)
from pcbedge.data.degrade import DEGRADATIONS
from pcbedge.data.qa_kinds import NEW_KINDS
from pcbedge.data.query import arrange, select

# Figures whose bench-minus-reference delta is reported (scalars; per-type dicts per type).
KINDS = ("where", "count", "exists") + NEW_KINDS
DELTA_KEYS = ("deeppcb_map", "deeppcb_f", "deeppcb_precision", "deeppcb_recall", "map_05",
              "count_exact_match", "hallucination_rate", "hallucinations_per_board",
              "median_center_error_px", "ece",
              "mean_confidence", "where_accuracy", "count_accuracy", "exists_accuracy",
              "exists_f1", "intent_accuracy") + tuple(f"{k}_accuracy" for k in NEW_KINDS)
BOX_TOL_PX = 1.0


def _defect(d: dict) -> dict:
    return {"type": d.get("type"), "bbox": [float(v) for v in d.get("bbox", ())],
            "confidence": float(d.get("confidence", 0.0))}


def describe_predictions(workload: Workload, answers: list[list[dict]]) -> list[list[dict]]:
    """Per board, the defects of its describe-all answer as {type, bbox, confidence}."""
    preds = []
    for i in range(len(workload.boards)):
        kinds = [q.qa.kind for q in workload.board_queries(i)]
        # A describe-only run (robustness) holds just the describe answer.
        k = 0 if len(answers[i]) == 1 else kinds.index("describe")
        preds.append([_defect(d) for d in answers[i][k].get("defects", [])])
    return preds


def _where_correct(gt_t: list[dict], reported: list[dict], t: str) -> bool:
    """Same number of defects of type t, and every GT box matched one-to-one at IoU > 0.33."""
    if len(gt_t) != len(reported):
        return False
    if not gt_t:
        return True
    return metrics.deeppcb_ap([gt_t], [reported], metrics.DEEPPCB_IOU, types=[t])["tp"] == len(gt_t)


def question_records(workload: Workload, answers: list[list[dict]]) -> list[dict]:
    """One record per typed or describe question: kind, filter, truth, pred, correct, intent_ok."""
    recs = []
    for i, board in enumerate(workload.boards):
        gt = board_ground_truth(board)
        for q, ans in zip(workload.board_queries(i), answers[i]):
            kind, t = q.qa.kind, q.qa.filter
            n_pred = int(ans.get("count", len(ans.get("defects", []))))
            rec = {"board": board.id, "kind": kind, "filter": t, "question": q.qa.question,
                   "intent_ok": ans.get("intent") == kind}
            if kind in NEW_KINDS:
                rec.update(_program_record(q.qa.meaning(), gt, ans, board))
                rec["intent_ok"] = ans.get("intent") == q.qa.meaning().intent
            elif kind != "describe":
                gt_t = [g for g in gt if g["type"] == t]
                if kind == "where":
                    reported = [_defect(d) for d in ans.get("defects", []) if d.get("type") == t]
                    rec.update(truth=len(gt_t), pred=len(reported),
                               correct=_where_correct(gt_t, reported, t))
                elif kind == "count":
                    rec.update(truth=len(gt_t), pred=n_pred, correct=n_pred == len(gt_t))
                else:  # exists: "yes" is an answer that reports at least one defect
                    rec.update(truth=bool(gt_t), pred=n_pred > 0,
                               correct=bool(gt_t) == (n_pred > 0))
            recs.append(rec)
    return recs


def _same_set(truth: list[dict], reported: list[dict]) -> bool:
    """Same number, and a one-to-one match of type and box (IoU > 0.33)."""
    if len(truth) != len(reported):
        return False
    if not truth:
        return True
    types = sorted({g["type"] for g in truth})
    got = metrics.deeppcb_ap([truth], [reported], metrics.DEEPPCB_IOU, types=types)
    return got["tp"] == len(truth) and all(d["type"] in types for d in reported)


def _program_record(program, gt: list[dict], ans: dict, board) -> dict:
    """A new-kind question scored by its meaning: the right answer is the annotations the
    program admits (types, scope), in its order. Totals and counts: the exact number; verdicts
    and is-there: pass/fail, yes/no; nearest / largest / smallest: the first defect listed is
    the right one; listings: the exact set."""
    w, h = board_size(board)
    truth = arrange(program, select(program, gt, w, h))
    reported = [_defect(d) for d in ans.get("defects", [])]
    n_pred = int(ans.get("count", len(reported)))
    if program.intent == "count":
        return {"truth": len(truth), "pred": n_pred, "correct": n_pred == len(truth)}
    if program.intent in ("exists", "verdict"):
        return {"truth": bool(truth), "pred": n_pred > 0, "correct": bool(truth) == (n_pred > 0)}
    if program.order != "reading":
        if not truth or not reported:
            return {"truth": len(truth), "pred": len(reported),
                    "correct": not truth and not reported}
        ok = _same_set(truth[:1], reported[:1])
        return {"truth": truth[0]["type"], "pred": reported[0]["type"], "correct": ok}
    return {"truth": len(truth), "pred": len(reported), "correct": _same_set(truth, reported)}


def confidence_spread(answers: list[list[dict]]) -> float | None:
    """The largest difference between two confidences one board's answers give the same defect
    (same type, same box to 0.1 px) across its questions; None when no defect repeats."""
    worst = None
    for board in answers:
        seen: dict[tuple, list[float]] = {}
        for ans in board:
            for d in ans.get("defects", []):
                key = (d.get("type"), tuple(round(float(v), 1) for v in d.get("bbox", ())))
                seen.setdefault(key, []).append(float(d.get("confidence", 0.0)))
        for confs in seen.values():
            if len(confs) > 1:
                spread = max(confs) - min(confs)
                worst = spread if worst is None else max(worst, spread)
    return worst


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def score_detections(gts: list[list[dict]], preds: list[list[dict]]) -> dict:
    """The describe-all detection figures (pooled AP, counts, hallucination, calibration)."""
    ap33 = metrics.deeppcb_ap(gts, preds, metrics.DEEPPCB_IOU)
    ap05 = metrics.deeppcb_ap(gts, preds, 0.5)
    confs = [d["confidence"] for p in preds for d in p]
    ece = metrics.expected_calibration_error(
        confs, metrics.prediction_correctness(gts, preds, metrics.DEEPPCB_IOU))
    hall = metrics.hallucination_rate(gts, preds)
    return {
        "deeppcb_map": ap33["ap"], "deeppcb_f": ap33["f_score"],
        "deeppcb_precision": ap33["precision"], "deeppcb_recall": ap33["recall"],
        "map_05": ap05["ap"],
        "per_type_ap_033": metrics.per_type_ap(gts, preds, metrics.DEEPPCB_IOU),
        "per_type_ap_05": metrics.per_type_ap(gts, preds, 0.5),
        "count_exact_match": metrics.count_exact_match(gts, preds),
        "hallucination_rate": hall["rate"], "n_hallucinated": hall["n_hallucinated"],
        "hallucinations_per_board": hall["n_hallucinated"] / len(gts) if gts else None,
        "n_predicted": hall["n_pred"], "n_ground_truth": ap33["n_gt"],
        "median_center_error_px": metrics.median_center_error(gts, preds, metrics.DEEPPCB_IOU),
        "ece": ece["ece"], "ece_bins": ece["bins"],
        "mean_confidence": float(np.mean(confs)) if confs else None,
    }


def score_accuracy(workload: Workload, answers: list[list[dict]]) -> dict:
    """Every accuracy figure of one run (see docs/bench.md for the definitions)."""
    gts = [board_ground_truth(b) for b in workload.boards]
    acc = {"n_boards": len(workload.boards), "n_questions": len(workload.queries)}
    acc.update(score_detections(gts, describe_predictions(workload, answers)))
    recs = question_records(workload, answers)
    by_kind = {k: [r for r in recs if r["kind"] == k] for k in KINDS}
    for k, rs in by_kind.items():
        acc[f"{k}_accuracy"] = _share([r["correct"] for r in rs])
        acc[f"n_{k}_questions"] = len(rs)
    acc["question_accuracy_by_kind"] = {k: acc[f"{k}_accuracy"] for k in KINDS
                                        if acc[f"{k}_accuracy"] is not None}
    acc["confidence_spread_max"] = confidence_spread(answers)
    ex = metrics.existence_f1([{"truth": r["truth"], "pred": r["pred"]} for r in by_kind["exists"]])
    acc["exists_f1"] = ex["f1"]
    acc["intent_accuracy"] = _share([r["intent_ok"] for r in recs])
    acc["intent_accuracy_by_kind"] = {
        k: _share([r["intent_ok"] for r in recs if r["kind"] == k])
        for k in ("describe",) + KINDS}
    return acc


# ----------------------------------------------------------------------------- drift

def _same_defects(a: list[dict], b: list[dict]) -> bool:
    """Same length and, paired in (type, box) order, same type and every box edge within 1 px."""
    if len(a) != len(b):
        return False
    key = lambda d: (str(d.get("type")), [float(v) for v in d.get("bbox", ())])  # noqa: E731
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        if x.get("type") != y.get("type") or len(x["bbox"]) != len(y["bbox"]):
            return False
        if any(abs(float(u) - float(v)) > BOX_TOL_PX for u, v in zip(x["bbox"], y["bbox"])):
            return False
    return True


def _delta(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _delta(a.get(k), b.get(k)) for k in a}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) - float(b)
    return None


def drift_block(answers: list[list[dict]], ref_answers: list[list[dict]], acc: dict,
                ref_acc: dict) -> dict:
    """Answer agreement with the reference run and the delta (bench - reference) of each figure."""
    pairs = [(a, r) for ab, rb in zip(answers, ref_answers) for a, r in zip(ab, rb)]
    agree = [_same_defects(a.get("defects", []), r.get("defects", [])) for a, r in pairs]
    keys = DELTA_KEYS + ("per_type_ap_033", "per_type_ap_05", "question_accuracy_by_kind")
    return {
        "available": True,
        "answer_agreement": _share(agree),
        "intent_agreement": _share([a.get("intent") == r.get("intent") for a, r in pairs]),
        "n_questions": len(pairs),
        "box_tolerance_px": BOX_TOL_PX,
        "delta": {k: _delta(acc.get(k), ref_acc.get(k)) for k in keys},
        "reference_accuracy": {k: ref_acc.get(k) for k in keys},
    }


# ----------------------------------------------------------------------------- robustness

ROBUST_KEYS = ("deeppcb_map", "deeppcb_precision", "count_exact_match", "mean_confidence",
               "ece")


def _ratio(v, clean):
    if isinstance(v, (int, float)) and isinstance(clean, (int, float)) and clean != 0 \
            and math.isfinite(clean):
        return float(v) / float(clean)
    return None


def run_robustness(runner, workload: Workload, clean: dict, *, progress: bool = True) -> dict:
    """describe-all accuracy under each degradation, and its ratio to the clean figure."""
    gts = [board_ground_truth(b) for b in workload.boards]
    conditions = {}
    for name, fn in DEGRADATIONS.items():
        answers = answer_boards(runner, workload, degrade=fn, describe_only=True,
                                progress=progress, desc=f"robust {name}")
        det = score_detections(gts, describe_predictions(workload, answers))
        row = {k: det[k] for k in ROBUST_KEYS}
        row.update({f"{k}_ratio": _ratio(det[k], clean.get(k)) for k in ROBUST_KEYS})
        conditions[name] = row
    return {"clean": {k: clean.get(k) for k in ROBUST_KEYS}, "conditions": conditions}
