"""Score bias correction of the INT8 vision graph (pcbedge.families.pcbvlm.score_bias), on a tiny model."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pcbedge.families.pcbvlm.score_bias import (decision_band, dihedral_views, estimate_score_bias,
                                      fold_score_offset, heat_logit_conv)
from pcbedge.calibration import select_calibration_set, select_heldout_set
from pcbedge.families.pcbvlm.recipe import iter_vision_inputs
from pcbedge.errors import ExportError
from pcbedge.testing import random_pair_input, tiny_bundle


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "score-bias-export")[1]


def _feeds(n: int = 3):
    return [{"pixel_values": random_pair_input(128, seed=s)[None]} for s in range(n)]


def test_decision_band_is_one_logit_either_side():
    lo, hi = decision_band(0.4)
    c = math.log(0.4 / 0.6)
    assert math.log(lo / (1 - lo)) == pytest.approx(c - 1.0)
    assert math.log(hi / (1 - hi)) == pytest.approx(c + 1.0)
    assert decision_band(0.5) == pytest.approx((1 / (1 + math.e), 1 - 1 / (1 + math.e)))


def test_dihedral_views_are_the_eight_symmetries():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    views = [v["pixel_values"] for v in dihedral_views([{"pixel_values": x}])]
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    assert np.array_equal(views[0], x)
    assert len({v.tobytes() for v in views}) == 8


def test_fold_shifts_every_logit_and_the_estimate_reads_it_back(export, tmp_path):
    """Folding an offset into the heat conv's bias moves every proposal's logit by exactly
    that much (boxes and order unchanged), and the estimator measures the same offset."""
    src = export / "vision.onnx"
    dst = tmp_path / "shifted.onnx"
    shutil.copyfile(src, dst)
    assert fold_score_offset(dst, 0.3) == heat_logit_conv(onnx.load(str(src))).name
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    names = ["region_scores", "region_boxes"]
    for feed in _feeds():
        (sa, ba), (sb, bb) = a.run(names, feed), b.run(names, feed)
        np.testing.assert_allclose(bb, ba, atol=1e-4)
        la, lb = np.log(sa / (1 - sa)), np.log(sb / (1 - sb))
        np.testing.assert_allclose(lb - la, -0.3, atol=2e-3)
    est = estimate_score_bias(src, dst, _feeds(), (0.0, 1.0))
    assert est["matched"] > 0 and est["views"] == 3
    assert est["offset"] == pytest.approx(-0.3, abs=2e-3)


def test_estimate_on_the_int8_graph_and_no_proposal_in_band(export, tmp_path, sample_data):
    from pcbedge.recipes.configs import StaticInt8Config
    from pcbedge.recipes.quantize import quantize_graph
    cal = select_calibration_set(sample_data)
    q = tmp_path / "v8.onnx"
    quantize_graph(export / "vision.onnx", q, StaticInt8Config(op_types=("Conv", "Relu")),
                   iter_vision_inputs(cal, 128))
    est = estimate_score_bias(export / "vision.onnx", q, _feeds(), (0.0, 1.0))
    assert est["matched"] > 0 and abs(est["offset"]) < 1.0 and est["stderr"] is not None
    empty = estimate_score_bias(export / "vision.onnx", q, _feeds(), (2.0, 3.0))
    assert empty == {"offset": 0.0, "stderr": None, "matched": 0, "gated": 0, "views": 3,
                     "band": [2.0, 3.0]}


def test_proposals_an_in_graph_rule_zeroed_are_left_out():
    """A matched proposal the INT8 graph scored exactly 0 (a consistency check flipped by a box
    moved a pixel) is counted as gated, not as a logit of -inf in the mean."""
    from pcbedge.families.pcbvlm.score_bias import matched_logit_diffs
    rb = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    rs = np.array([0.5, 0.6, 0.9], np.float32)
    qb = rb + 0.5
    qs = np.array([0.55, 0.0, 0.9], np.float32)
    diffs, gated = matched_logit_diffs(rs, rb, qs, qb, (0.3, 0.7))
    assert gated == 1 and len(diffs) == 1
    assert diffs[0] == pytest.approx(math.log(0.55 / 0.45), abs=1e-5)


def test_heat_logit_conv_must_be_unique(export):
    with pytest.raises(ExportError, match="has 0"):
        heat_logit_conv(onnx.load(str(export / "decoder_prefill.onnx")))


def test_heldout_boards_are_disjoint_and_deterministic(sample_data):
    full = select_calibration_set(sample_data, n=16, list_file="trainval.txt")
    held = select_heldout_set(full, 20)
    again = select_heldout_set(full, 20)
    assert len(held) == 20 and held.sha256 == again.sha256
    assert not {e.board_id for e in held.entries} & {e.board_id for e in full.entries}
    assert held.list_file == "trainval.txt" and held.root == full.root
    # the sample's calib.txt holds exactly the 16 calibration boards: nothing is held out
    assert len(select_heldout_set(select_calibration_set(sample_data), 64)) == 0
