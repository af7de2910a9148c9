"""Hand-checkable cases for pcbedge.benchmarks.metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pcbedge.benchmarks import metrics as M
from pcbedge.errors import DatasetError, PcbEdgeError


def gt(kind, box):
    return {"type": kind, "bbox": list(box)}


def pr(kind, box, conf):
    return {"type": kind, "bbox": list(box), "confidence": conf}


A, B = (0, 0, 10, 10), (20, 20, 30, 30)


def test_iou_and_matrix_agree():
    assert M.iou(A, A) == 1.0
    assert M.iou(A, B) == 0.0
    assert M.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    mat = M.iou_matrix(np.array([A, B], float), np.array([A, (5, 0, 15, 10), B], float))
    assert mat.shape == (2, 3)
    assert mat[0, 1] == pytest.approx(1 / 3) and mat[1, 2] == 1.0
    assert M.iou_matrix(np.zeros((0, 4)), np.array([A], float)).shape == (0, 1)
    assert M.iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # zero-area boxes never overlap


def test_intersection_over_the_smaller_box():
    from pcbedge.geometry import iomin_matrix, overlap_matrix
    big, inside, astride, apart = (0, 0, 40, 40), (5, 5, 15, 15), (30, 10, 50, 20), (60, 60, 70, 70)
    m = iomin_matrix(np.array([big], float), np.array([inside, astride, apart, big], float))
    assert m[0].tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0])   # astride: half of it inside
    assert M.iou(big, inside) == pytest.approx(100 / 1600)        # where IoU stays low
    assert np.array_equal(iomin_matrix(np.array([inside], float), np.array([big], float)),
                          iomin_matrix(np.array([big], float), np.array([inside], float)).T)
    assert iomin_matrix(np.array([(1, 1, 1, 1)], float), np.array([big], float))[0, 0] == 0.0
    assert overlap_matrix(np.array([big], float), np.array([inside], float), "iou")[0, 0] == \
        pytest.approx(100 / 1600)
    with pytest.raises(ValueError, match="iomax"):
        overlap_matrix(np.array([big], float), np.array([inside], float), "iomax")


def test_perfect_predictions():
    gts = [[gt("open", A), gt("short", B)], [gt("spur", A)]]
    preds = [[pr("open", A, 0.9), pr("short", B, 0.8)], [pr("spur", A, 0.7)]]
    r = M.deeppcb_ap(gts, preds)
    assert r == {"ap": 1.0, "precision": 1.0, "recall": 1.0, "f_score": 1.0,
                 "tp": 3, "fp": 0, "n_gt": 3}
    per = M.per_type_ap(gts, preds)
    assert per["open"] == per["short"] == per["spur"] == 1.0
    assert per["mousebite"] is None and per["pin_hole"] is None
    assert M.count_exact_match(gts, preds) == 1.0
    assert M.center_errors(gts, preds) == [0.0, 0.0, 0.0]


def test_all_missed():
    gts = [[gt("open", A)], [gt("short", B)]]
    r = M.deeppcb_ap(gts, [[pr("open", B, 0.9)], []])
    assert r["ap"] == 0.0 and r["recall"] == 0.0 and r["f_score"] == 0.0
    assert r["tp"] == 0 and r["fp"] == 1 and r["n_gt"] == 2
    none = M.deeppcb_ap(gts, [[], []])
    assert none["ap"] == 0.0 and none["recall"] == 0.0 and none["precision"] is None


def test_wrong_type_is_not_a_true_positive():
    gts = [[gt("open", A)]]
    preds = [[pr("short", A, 0.9)]]
    r = M.deeppcb_ap(gts, preds)
    assert r["tp"] == 0 and r["fp"] == 1 and r["ap"] == 0.0
    assert M.prediction_correctness(gts, preds) == [False]
    # It still overlaps a real defect, so it is not a hallucination.
    assert M.hallucination_rate(gts, preds)["n_hallucinated"] == 0


def test_duplicate_is_false_positive_and_ap_by_hand():
    # Two GTs; p1 hits A, p2 duplicates A, p3 hits B.
    # recall .5 .5 1, precision 1 .5 2/3 -> envelope 1, 2/3, 2/3 -> AP = .5*1 + .5*2/3 = 5/6.
    gts = [[gt("open", A), gt("open", B)]]
    preds = [[pr("open", A, 0.9), pr("open", A, 0.8), pr("open", B, 0.7)]]
    r = M.deeppcb_ap(gts, preds)
    assert r["tp"] == 2 and r["fp"] == 1
    assert r["ap"] == pytest.approx(5 / 6)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == 1.0
    assert r["f_score"] == pytest.approx(0.8)
    assert M.prediction_correctness(gts, preds) == [True, False, True]


def test_ap_is_icdar_style_without_envelope():
    # FP first: precision 1/2 and 2/3 at the two TPs -> (1/2 + 2/3) / 2 = 7/12 (VOC's
    # interpolated envelope would give 2/3; DeepPCB's script does not interpolate).
    gts = [[gt("open", A)], [gt("open", B)]]
    preds = [[pr("open", B, 0.9), pr("open", A, 0.8)], [pr("open", B, 0.7)]]
    assert M.deeppcb_ap(gts, preds)["ap"] == pytest.approx(7 / 12)


def test_matching_pools_confidence_across_boards():
    # The low-confidence TP on board 1 comes last in the pooled ranking.
    gts = [[gt("open", A)], [gt("open", A)]]
    preds = [[pr("open", A, 0.9), pr("open", B, 0.8)], [pr("open", A, 0.1)]]
    # order TP(.9) FP(.8) TP(.1): rec .5 .5 1, prec 1 .5 2/3 -> AP 5/6
    assert M.deeppcb_ap(gts, preds)["ap"] == pytest.approx(5 / 6)


def test_empty_boards():
    gts, preds = [[], []], [[], []]
    assert M.count_exact_match(gts, preds) == 1.0
    assert M.hallucination_rate(gts, preds) == {"rate": 0.0, "n_hallucinated": 0, "n_pred": 0}
    r = M.deeppcb_ap(gts, preds)
    assert r["ap"] is None and r["recall"] is None and r["tp"] == 0 and r["n_gt"] == 0
    assert M.median_center_error(gts, preds) is None


def test_iou_exactly_at_threshold_does_not_count():
    gts = [[gt("open", (0, 0, 100, 1))]]
    at = [[pr("open", (0, 0, 33, 1), 0.9)]]  # IoU = 33 / 100 == 0.33
    above = [[pr("open", (0, 0, 34, 1), 0.9)]]
    assert M.iou((0, 0, 100, 1), (0, 0, 33, 1)) == 0.33
    assert M.deeppcb_ap(gts, at)["tp"] == 0
    assert M.deeppcb_ap(gts, above)["tp"] == 1


def test_hallucination_and_count_match():
    gts = [[gt("open", A)], []]
    preds = [[pr("open", A, 0.9), pr("spur", B, 0.5)], [pr("short", B, 0.4)]]
    assert M.hallucination_rate(gts, preds) == {"rate": 2 / 3, "n_hallucinated": 2, "n_pred": 3}
    assert M.count_exact_match(gts, preds) == 0.0
    assert M.count_exact_match([[gt("open", A)], []], [[pr("spur", B, 0.1)], []]) == 1.0


def test_center_errors_of_shifted_box():
    gts = [[gt("open", (0, 0, 10, 10))]]
    preds = [[pr("open", (3, 4, 13, 14), 0.9)]]  # IoU = 42/158 < .33 -> no match
    assert M.center_errors(gts, preds) == []
    preds = [[pr("open", (0, 1, 10, 11), 0.9)]]  # centre moved by 1 pixel
    assert M.center_errors(gts, preds) == [1.0]
    assert M.median_center_error(gts, preds) == 1.0


def test_ece_perfectly_calibrated():
    conf = [0.25] * 4 + [0.75] * 4
    correct = [True, False, False, False] + [True, True, True, False]
    r = M.expected_calibration_error(conf, correct, n_bins=10)
    assert r["ece"] == pytest.approx(0.0)
    assert len(r["bins"]) == 10
    assert r["bins"][2]["count"] == 4 and r["bins"][2]["accuracy"] == 0.25
    assert r["bins"][0]["count"] == 0 and r["bins"][0]["mean_conf"] is None


def test_ece_known_value_and_edges():
    r = M.expected_calibration_error([1.0, 1.0, 0.0, 0.0], [True, False, False, False], 2)
    # bin [0, .5): conf 0, acc 0 -> 0; bin [.5, 1]: conf 1, acc .5 -> .5 * 2/4
    assert r["ece"] == pytest.approx(0.25)
    assert M.expected_calibration_error([], [])["ece"] is None
    with pytest.raises(DatasetError):
        M.expected_calibration_error([1.5], [True])
    with pytest.raises(DatasetError):
        M.expected_calibration_error([0.5], [True, False])


def test_existence_f1_and_accuracy():
    recs = [{"truth": True, "pred": True}, {"truth": True, "pred": False},
            {"truth": False, "pred": True}, {"truth": False, "pred": False},
            {"truth": True, "pred": True}]
    r = M.existence_f1(recs)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(3 / 5)
    assert r["n"] == 5
    assert M.existence_f1([{"truth": False, "pred": False}])["f1"] is None
    assert M.accuracy([{"truth": "open", "pred": "open"}, {"truth": "3", "pred": 3}]) == 0.5
    assert M.accuracy([]) is None
    with pytest.raises(DatasetError):
        M.existence_f1([{"truth": "yes", "pred": True}])


def test_bad_inputs_are_typed_errors():
    with pytest.raises(DatasetError):
        M.deeppcb_ap([[]], [])
    with pytest.raises(DatasetError):
        M.deeppcb_ap([[gt("scratch", A)]], [[]])
    with pytest.raises(DatasetError):
        M.deeppcb_ap([[]], [[{"type": "open", "bbox": list(A)}]])  # no confidence
    with pytest.raises(DatasetError):
        M.deeppcb_ap([[gt("open", (10, 0, 0, 10))]], [[]])
    with pytest.raises(DatasetError):
        M.deeppcb_ap([[]], [[]], types=["scratch"])
    with pytest.raises(PcbEdgeError):
        M.deeppcb_ap([[]], [[]], iou_thr=1.5)
    # An unknown predicted type is model output: a false positive, not an error.
    assert M.deeppcb_ap([[gt("open", A)]], [[pr("scratch", A, 0.9)]])["fp"] == 1


def _brute_coverage(n, q, lo, hi):
    pmf = [math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(n + 1)]
    return sum(pmf[(lo or 0):(hi if hi is not None else n + 1)]), pmf


@pytest.mark.parametrize("n,q,conf", [(100, 0.95, 0.95), (30, 0.5, 0.9), (250, 0.99, 0.95)])
def test_order_ranks_against_brute_force(n, q, conf):
    b = M.percentile_bound(list(range(n)), q=q, confidence=conf)
    lo, hi = b["lower_rank"], b["upper_rank"]
    cover, pmf = _brute_coverage(n, q, lo, hi)
    assert cover == pytest.approx(b["coverage"], rel=1e-9) and cover >= conf
    half = (1 - conf) / 2
    # Tightest choice: one step further inwards breaks the tail budget.
    assert sum(pmf[:lo]) <= half and (lo == n or sum(pmf[:lo + 1]) > half)
    if hi is not None:
        assert sum(pmf[hi:]) <= half and (hi == 1 or sum(pmf[hi - 1:]) > half)
    if lo is not None:
        assert b["lower"] == lo - 1  # samples are 0..n-1, so X_(l) = l - 1


def test_percentile_bound_covers_true_quantile():
    rng = np.random.default_rng(1234)
    true_q = -math.log(0.05)  # 0.95 quantile of Exp(1)
    hits = 0
    for _ in range(300):
        b = M.percentile_bound(rng.exponential(size=100), q=0.95, confidence=0.95)
        hits += (b["lower"] <= true_q) and (b["upper"] is None or true_q <= b["upper"])
    assert hits / 300 >= 0.92


def test_percentile_bound_small_n_and_large_n():
    small = M.percentile_bound([1.0, 2.0, 3.0], q=0.95, confidence=0.95)
    assert small["upper"] is None and "too small" in small["note"]
    assert small["point"] == pytest.approx(2.9)  # numpy "linear"
    big = M.percentile_bound(list(np.linspace(0, 1, 20000)), q=0.95)
    assert big["lower"] < 0.95 < big["upper"] and big["note"] is None
    with pytest.raises(PcbEdgeError):
        M.percentile_bound([], q=0.95)
    with pytest.raises(PcbEdgeError):
        M.percentile_bound([1.0], q=1.0)


def test_latency_summary():
    s = M.latency_summary([float(v) for v in range(1, 101)])
    assert s["n"] == 100 and s["max"] == 100.0 and s["mean"] == 50.5
    assert s["p50"] == pytest.approx(50.5) and s["p95"] == pytest.approx(95.05)
    assert s["p95_bound"]["point"] == s["p95"]
    assert s["p95_bound"]["lower"] <= s["p95"] <= s["p95_bound"]["upper"]
