"""Accuracy and latency metrics with hand-checkable definitions (numpy + stdlib only).

Detection inputs are aligned per board: ``gts[i]`` is a list of ``{"type", "bbox"}`` dicts and
``preds[i]`` a list of ``{"type", "bbox", "confidence"}`` dicts for the same board ``i``.
Boxes are ``[x1, y1, x2, y2]`` in pixels with continuous area ``(x2 - x1) * (y2 - y1)`` (no +1),
as in the ICDAR-2015 script that the DeepPCB evaluation is built on.

Matching (shared by AP, centre errors and per-prediction correctness): predictions are taken in
descending confidence order (a stable sort, so ties keep board order then list order); each one
is matched to the unmatched ground-truth box of the same type on the same board with the highest
IoU, and is a true positive only when that IoU is strictly greater than ``iou_thr``. A second
detection of an already-matched box is therefore a false positive.

A prediction whose type is not a DeepPCB type is kept and counted as a false positive: it is model
output, not user input. An unknown ground-truth type is a :class:`DatasetError`.
Undefined ratios (nothing to divide by) are ``None``, never a made-up 0 or 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.errors import DatasetError, PcbEdgeError
from pcbedge.geometry import iou, iou_matrix  # noqa: F401  (the one IoU; iou re-exported)

DEEPPCB_IOU = 0.33
HALLUCINATION_IOU = 0.1


# ----------------------------------------------------------------------------- boxes and IoU

def parse_bbox(d: dict, where: str) -> tuple[float, float, float, float]:
    """The ``bbox`` of a defect dict as four floats; ``where`` names it in the error message."""
    bbox = d.get("bbox") if isinstance(d, dict) else None
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: bbox {bbox!r} is not four numbers",
                           fix='give "bbox": [x1, y1, x2, y2] in pixels') from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        raise DatasetError(f"{where}: bbox {bbox!r} is not a finite box with x1<=x2, y1<=y2",
                           fix="write boxes as [x1, y1, x2, y2] (top-left, bottom-right)")
    return x1, y1, x2, y2


# ----------------------------------------------------------------------------- input checks

def _check_types(types) -> tuple[str, ...]:
    if types is None:
        return DEFECT_TYPES
    bad = [t for t in types if t not in DEFECT_TYPES]
    if bad or not types:
        raise DatasetError(f"unknown or empty defect types {list(types)!r}",
                           fix=f"use a non-empty subset of: {', '.join(DEFECT_TYPES)}")
    return tuple(types)


def _check_thr(iou_thr: float) -> float:
    if not isinstance(iou_thr, (int, float)) or not 0.0 <= iou_thr < 1.0:
        raise PcbEdgeError(f"iou_thr {iou_thr!r} is not a number in [0, 1)",
                           fix="use e.g. 0.33 (DeepPCB) or 0.5")
    return float(iou_thr)


def _check_aligned(gts: list, preds: list) -> None:
    if not isinstance(gts, list) or not isinstance(preds, list):
        raise DatasetError("gts and preds must be lists with one list of dicts per board",
                           fix="pass gts=[[{...}, ...], ...], preds=[[{...}, ...], ...]")
    if len(gts) != len(preds):
        raise DatasetError(f"{len(gts)} ground-truth boards but {len(preds)} prediction boards",
                           fix="give exactly one (possibly empty) prediction list per board")


def _gt_board(board: list[dict], i: int, types: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    kinds, boxes = [], []
    for j, d in enumerate(board):
        where = f"board {i} ground truth {j}"
        kind = d.get("type") if isinstance(d, dict) else None
        if kind not in DEFECT_TYPES:
            raise DatasetError(f"{where}: unknown defect type {kind!r}",
                               fix=f"use one of: {', '.join(DEFECT_TYPES)}")
        box = parse_bbox(d, where)
        if kind in types:
            kinds.append(kind)
            boxes.append(box)
    return kinds, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _confidence(d: dict, where: str) -> float:
    conf = d.get("confidence")
    if isinstance(conf, bool) or not isinstance(conf, (int, float, np.floating)) \
            or not math.isfinite(conf):
        raise DatasetError(f"{where}: confidence {conf!r} is not a finite number",
                           fix='give every prediction a "confidence" in [0, 1]')
    return float(conf)


# ----------------------------------------------------------------------------- greedy matching

@dataclass
class _Matching:
    """Result of the greedy same-type matching, one entry per kept prediction (flatten order)."""

    board: list[int]          # board index of each kept prediction
    index: list[int]          # index inside its board's prediction list
    confidence: np.ndarray    # [k]
    is_tp: np.ndarray         # [k] bool
    pairs: list[tuple[tuple, tuple] | None]  # (pred bbox, gt bbox) of each true positive
    n_gt: int


def _match_board(kinds, gt_boxes, p_kinds, p_boxes, p_conf, thr):
    """Matches one board; only the order of this board's predictions matters for its matches."""
    ious = iou_matrix(np.asarray(p_boxes).reshape(-1, 4), gt_boxes)
    taken = np.zeros(len(kinds), dtype=bool)
    gt_kinds = np.asarray(kinds, dtype=object)
    is_tp = [False] * len(p_kinds)
    pairs: list = [None] * len(p_kinds)
    for p in np.argsort(-np.asarray(p_conf, dtype=np.float64), kind="stable"):
        ok = (~taken) & (gt_kinds == p_kinds[p])
        if not ok.any():
            continue
        cand = np.where(ok, ious[p], -1.0)
        g = int(np.argmax(cand))
        if cand[g] > thr:
            taken[g] = True
            is_tp[p] = True
            pairs[p] = (tuple(p_boxes[p]), tuple(gt_boxes[g]))
    return is_tp, pairs


def _match(gts, preds, iou_thr, types=None) -> _Matching:
    _check_aligned(gts, preds)
    thr, kept_types = _check_thr(iou_thr), _check_types(types)
    out = _Matching([], [], np.zeros(0), np.zeros(0, dtype=bool), [], 0)
    confs, tps = [], []
    for i, (g_board, p_board) in enumerate(zip(gts, preds)):
        kinds, gt_boxes = _gt_board(g_board, i, kept_types)
        out.n_gt += len(kinds)
        p_kinds, p_boxes, p_conf = [], [], []
        for j, d in enumerate(p_board):
            where = f"board {i} prediction {j}"
            kind = d.get("type") if isinstance(d, dict) else None
            if not isinstance(kind, str):
                raise DatasetError(f"{where}: type {kind!r} is not a string",
                                   fix=f"use one of: {', '.join(DEFECT_TYPES)}")
            box, conf = parse_bbox(d, where), _confidence(d, where)
            # Unknown predicted types stay in the pooled set (always false positives).
            if types is not None and kind not in kept_types:
                continue
            p_kinds.append(kind)
            p_boxes.append(box)
            p_conf.append(conf)
            out.board.append(i)
            out.index.append(j)
        is_tp, pairs = _match_board(kinds, gt_boxes, p_kinds, p_boxes, p_conf, thr)
        confs += p_conf
        tps += is_tp
        out.pairs += pairs
    out.confidence = np.asarray(confs, dtype=np.float64)
    out.is_tp = np.asarray(tps, dtype=bool)
    return out


# ----------------------------------------------------------------------------- DeepPCB AP

def _average_precision(tp_sorted: np.ndarray, n_gt: int) -> float | None:
    """ICDAR-2015 AP, as DeepPCB's own evaluation script computes it: the precision at the rank
    of each true positive, summed and divided by the number of ground-truth defects (no
    interpolation, so it is never above the VOC all-point figure)."""
    if n_gt == 0:
        return None
    if tp_sorted.size == 0:
        return 0.0
    ranks = np.arange(1, tp_sorted.size + 1)
    prec_at = np.cumsum(tp_sorted) / ranks
    return float(np.sum(prec_at[tp_sorted.astype(bool)]) / n_gt)


def deeppcb_ap(gts: list[list[dict]], preds: list[list[dict]], iou_thr: float = DEEPPCB_IOU,
               types: list[str] | None = None) -> dict:
    """One AP pooled over all boards and ``types`` (default all six), plus P/R/F of all predictions.

    ``ap`` and ``recall`` are None without ground truth; ``precision`` is None without
    predictions; ``f_score`` is 0.0 when there is ground truth but no true positive.
    """
    m = _match(gts, preds, iou_thr, types)
    order = np.argsort(-m.confidence, kind="stable")
    tp, n_pred = int(m.is_tp.sum()), int(m.is_tp.size)
    precision = tp / n_pred if n_pred else None
    recall = tp / m.n_gt if m.n_gt else None
    if recall is None:
        f_score = None
    elif tp == 0:
        f_score = 0.0
    else:
        f_score = 2 * precision * recall / (precision + recall)
    return {"ap": _average_precision(m.is_tp[order], m.n_gt), "precision": precision,
            "recall": recall, "f_score": f_score, "tp": tp, "fp": n_pred - tp, "n_gt": m.n_gt}


def per_type_ap(gts: list[list[dict]], preds: list[list[dict]],
                iou_thr: float = DEEPPCB_IOU) -> dict[str, float | None]:
    """AP of each defect type alone; None for a type with no ground truth."""
    return {t: deeppcb_ap(gts, preds, iou_thr, types=[t])["ap"] for t in DEFECT_TYPES}


def prediction_correctness(gts: list[list[dict]], preds: list[list[dict]],
                           iou_thr: float = DEEPPCB_IOU) -> list[bool]:
    """Is each prediction (flattened board by board, in list order) a true positive?"""
    return [bool(v) for v in _match(gts, preds, iou_thr).is_tp]


def center_errors(gts: list[list[dict]], preds: list[list[dict]],
                  iou_thr: float = DEEPPCB_IOU) -> list[float]:
    """Pixel distance between box centres of each matched (same type, IoU > thr) pair."""
    out = []
    for pair in _match(gts, preds, iou_thr).pairs:
        if pair is None:
            continue
        (a1, b1, a2, b2), (c1, d1, c2, d2) = pair
        out.append(math.hypot((a1 + a2 - c1 - c2) / 2.0, (b1 + b2 - d1 - d2) / 2.0))
    return out


def median_center_error(gts: list[list[dict]], preds: list[list[dict]],
                        iou_thr: float = DEEPPCB_IOU) -> float | None:
    """Median of :func:`center_errors`; None when nothing matched."""
    errs = center_errors(gts, preds, iou_thr)
    return float(np.median(errs)) if errs else None


# ----------------------------------------------------------------------------- board-level rates

def hallucination_rate(gts: list[list[dict]], preds: list[list[dict]],
                       iou_thr: float = HALLUCINATION_IOU) -> dict:
    """Share of predicted defects that overlap no ground-truth defect of any type (IoU > thr).

    No one-to-one matching: a prediction near any real defect is not a hallucination, even if
    its type or its duplicate status is wrong (AP already punishes those).
    """
    _check_aligned(gts, preds)
    thr = _check_thr(iou_thr)
    n_pred = n_hall = 0
    for i, (g_board, p_board) in enumerate(zip(gts, preds)):
        _, gt_boxes = _gt_board(g_board, i, DEFECT_TYPES)
        p_boxes = [parse_bbox(d, f"board {i} prediction {j}") for j, d in enumerate(p_board)]
        n_pred += len(p_boxes)
        if not p_boxes:
            continue
        best = iou_matrix(np.asarray(p_boxes), gt_boxes).max(axis=1, initial=0.0)
        n_hall += int((best <= thr).sum())
    return {"rate": n_hall / n_pred if n_pred else 0.0, "n_hallucinated": n_hall,
            "n_pred": n_pred}


def count_exact_match(gts: list[list[dict]], preds: list[list[dict]]) -> float | None:
    """Share of boards whose number of predicted defects equals the number of real ones."""
    _check_aligned(gts, preds)
    if not gts:
        return None
    return sum(len(g) == len(p) for g, p in zip(gts, preds)) / len(gts)


# ----------------------------------------------------------------------------- calibration

def expected_calibration_error(confidences: list[float], correct: list[bool],
                               n_bins: int = 10) -> dict:
    """ECE over ``n_bins`` equal-width bins of [0, 1] (last bin closed); empty input: ece None.

    Bin i holds lo <= c < hi; empty bins are listed with count 0 and None means so that a
    reliability diagram can still draw every bin.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise PcbEdgeError(f"n_bins {n_bins!r} is not a positive integer", fix="use e.g. 10")
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=bool).reshape(-1)
    if conf.size != hit.size:
        raise DatasetError(f"{conf.size} confidences but {hit.size} correctness flags",
                           fix="pass prediction_correctness(...) for the same predictions")
    if conf.size and (not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1):
        raise DatasetError("confidences must be finite numbers in [0, 1]",
                           fix="rescale model scores to probabilities before calibration")
    idx = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        count = int(sel.sum())
        mean_conf = float(conf[sel].mean()) if count else None
        acc = float(hit[sel].mean()) if count else None
        if count:
            ece += count / conf.size * abs(acc - mean_conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count,
                     "mean_conf": mean_conf, "accuracy": acc})
    return {"ece": float(ece) if conf.size else None, "bins": bins}


# ----------------------------------------------------------------------------- question level

def _pairs(records: list[dict], need_bool: bool) -> list[tuple]:
    out = []
    for k, r in enumerate(records):
        if not isinstance(r, dict) or "truth" not in r or "pred" not in r:
            raise DatasetError(f"record {k} ({r!r}) lacks 'truth' or 'pred'",
                               fix='give each record as {"truth": ..., "pred": ...}')
        if need_bool and not all(isinstance(r[x], (bool, np.bool_)) for x in ("truth", "pred")):
            raise DatasetError(f"record {k}: truth/pred {r['truth']!r}/{r['pred']!r} are not bools",
                               fix="parse the yes/no answer to True/False first")
        out.append((r["truth"], r["pred"]))
    return out


def existence_f1(records: list[dict]) -> dict:
    """F1 of "is there a defect?" answers, with a defect (True) as the positive class."""
    pairs = _pairs(records, need_bool=True)
    tp = sum(bool(t) and bool(p) for t, p in pairs)
    fp = sum(not t and bool(p) for t, p in pairs)
    fn = sum(bool(t) and not p for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None if tp + fp + fn == 0 else 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"f1": f1, "precision": precision, "recall": recall,
            "accuracy": accuracy(records), "n": len(pairs)}


def accuracy(records: list[dict]) -> float | None:
    """Share of records whose ``pred == truth`` (plain equality: normalise answers first)."""
    pairs = _pairs(records, need_bool=False)
    return sum(t == p for t, p in pairs) / len(pairs) if pairs else None


# ----------------------------------------------------------------------------- latency

def _binomial_pmf(n: int, q: float) -> list[float]:
    """P(B = k) for B ~ Binomial(n, q), k = 0..n, via log-gamma so n in the 10^4s is stable."""
    lq, l1q, lnf = math.log(q), math.log1p(-q), math.lgamma(n + 1)
    return [math.exp(lnf - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lq + (n - k) * l1q)
            for k in range(n + 1)]


def _order_ranks(n: int, q: float, confidence: float) -> tuple[int | None, int | None, float]:
    """1-based ranks (l, u) with P(X_(l) <= x_q <= X_(u)) >= confidence, and that coverage.

    With B = #{samples < x_q} ~ Binomial(n, q) (continuous distribution), X_(l) <= x_q iff
    B >= l and x_q <= X_(u) iff B <= u - 1, so coverage = P(l <= B <= u - 1). Each tail gets
    at most (1 - confidence) / 2; a side that cannot meet it is None (unbounded).
    """
    pmf = _binomial_pmf(n, q)
    half = (1.0 - confidence) / 2.0
    below = 0.0  # P(B < l) for the next candidate l
    lo = None
    for rank in range(1, n + 1):
        below += pmf[rank - 1]
        if below > half:
            break
        lo = rank
    above = 0.0  # P(B >= u), summed from the right so the small tail keeps its precision
    hi = None
    for rank in range(n, 0, -1):
        above += pmf[rank]
        if above > half:
            break
        hi = rank
    cover = math.fsum(pmf[(lo or 0):(hi if hi is not None else n + 1)])
    return lo, hi, cover


def percentile_bound(samples: list[float], q: float = 0.95, confidence: float = 0.95) -> dict:
    """Point estimate and a distribution-free order-statistic interval for the q-quantile.

    ``point`` uses numpy's "linear" quantile method (type 7 of Hyndman & Fan). ``lower``/``upper``
    are order statistics X_(l), X_(u) chosen from Binomial(n, q) so that the interval covers the
    true quantile with probability >= ``confidence`` (exact for continuous data, conservative
    otherwise); ``coverage`` is that guaranteed probability.
    """
    for name, v in (("q", q), ("confidence", confidence)):
        if not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            raise PcbEdgeError(f"{name} {v!r} is not in (0, 1)", fix="use e.g. 0.95")
    x = np.sort(np.asarray(samples, dtype=np.float64).reshape(-1))
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise PcbEdgeError(f"cannot bound the {q} quantile of {x.size} samples (empty or NaN)",
                           fix="time at least one run and drop failed runs before summarising")
    n = int(x.size)
    lo, hi, cover = _order_ranks(n, q, confidence)
    notes = []
    if lo is None:
        notes.append(f"n={n} too small for a lower bound at {confidence:.0%} confidence")
    if hi is None:
        notes.append(f"n={n} too small for an upper bound at {confidence:.0%} confidence; "
                     f"need q**n <= {(1 - confidence) / 2:g}")
    return {"point": float(np.quantile(x, q, method="linear")),
            "lower": float(x[lo - 1]) if lo is not None else None,
            "upper": float(x[hi - 1]) if hi is not None else None,
            "n": n, "q": q, "confidence": confidence, "lower_rank": lo, "upper_rank": hi,
            "coverage": cover, "note": "; ".join(notes) or None}


def latency_summary(ms: list[float]) -> dict:
    """Percentiles (numpy "linear"), max, mean and count of latencies, plus a P95 interval."""
    bound = percentile_bound(ms, q=0.95, confidence=0.95)
    x = np.asarray(ms, dtype=np.float64).reshape(-1)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(x, [50, 90, 95, 99], method="linear"))
    return {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "max": float(x.max()),
            "mean": float(x.mean()), "n": int(x.size), "p95_bound": bound}
