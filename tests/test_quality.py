"""Confidence falls with capture quality: the penalty, its fit, and the answer it shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pcbedge.families.pcbvlm.grammar import calibrate, quality_penalty

pytest.importorskip("torch")
from pcbedge.families.pcbvlm.model.quality import fit_quality  # noqa: E402

BLOCK = {"residual_ref": 0.04, "c": 1.5}


def test_no_penalty_for_clean_boards_or_without_a_block():
    assert quality_penalty({"residual": 0.02}, {"quality": BLOCK}) == 0.0
    assert quality_penalty({"residual": 0.04}, {"quality": BLOCK}) == 0.0
    assert quality_penalty({"residual": 0.5}, {"a": 1.0, "b": 0.0}) == 0.0
    assert quality_penalty(None, {"quality": BLOCK}) == 0.0
    assert quality_penalty({"residual": float("nan")}, {"quality": BLOCK}) == 0.0


def test_penalty_grows_with_the_residual_and_lowers_confidence():
    cal = {"a": 1.0, "b": 0.0, "quality": BLOCK}
    pens = [quality_penalty({"residual": r}, cal) for r in (0.05, 0.1, 0.3)]
    assert 0 < pens[0] < pens[1] < pens[2]
    assert pens[1] == pytest.approx(1.5 * math.log(0.1 / 0.04))
    logp = math.log(0.95)
    confs = [calibrate(logp, cal, p) for p in (0.0, *pens)]
    assert all(a > b for a, b in zip(confs, confs[1:]))


def _records(rng, n, slope):
    """Records whose accuracy falls with log(residual) at the given slope."""
    out = []
    for _ in range(n):
        z = rng.normal(2.5, 1.0)
        r = float(np.exp(rng.uniform(np.log(0.01), np.log(0.5))))
        u = max(0.0, math.log(r / 0.04))
        p = 1 / (1 + math.exp(-(z - slope * u)))
        out.append((z, r, bool(rng.random() < p)))
    return out


def test_fit_recovers_the_slope_and_never_goes_negative():
    rng = np.random.default_rng(0)
    clean = list(rng.uniform(0.005, 0.04, 300))
    block = fit_quality(_records(rng, 6000, 1.5), clean)
    assert block["residual_ref"] == pytest.approx(np.percentile(clean, 95), abs=1e-6)
    assert block["c"] == pytest.approx(1.5, abs=0.3)
    # accuracy that does not fall with the residual: no penalty at all
    assert fit_quality(_records(rng, 4000, 0.0), clean)["c"] < 0.15
    # accuracy that rises with the residual: clipped at 0, never a bonus
    assert fit_quality(_records(rng, 4000, -1.0), clean)["c"] == 0.0


def test_calibrate_applies_the_penalty_to_the_calibrated_logit():
    cal = {"a": 0.5, "b": 0.3, "quality": BLOCK}
    logp = math.log(0.9)
    pen = quality_penalty({"residual": 0.2}, cal)
    want = 1 / (1 + math.exp(-(0.5 * math.log(0.9 / 0.1) + 0.3 - 1.5 * math.log(0.2 / 0.04))))
    assert calibrate(logp, cal, pen) == pytest.approx(want)


def _state(calibration):
    from pcbedge.families.pcbvlm.grammar import DecodeState, grammar_spec
    from pcbedge.families.pcbvlm.tokenizer import build_tokenizer
    vocab = build_tokenizer(["where is the short"], 4).get_vocab(with_added_tokens=True)
    st = DecodeState(grammar_spec(vocab, 4, 0.05, calibration), np.ones(4, np.float32))
    st.intent, st.filter, st.done = "describe", "all", True
    st.defects = [("short", 0, math.log(0.97)), ("spur", 2, math.log(0.8))]
    return st


def test_answer_reports_quality_and_warns():
    from pcbedge.data.query import Program
    from pcbedge.families.pcbvlm.grammar import board_defects, build_answer
    boxes = np.array([[10, 10, 20, 20], [0, 0, 5, 5], [30, 30, 40, 44], [1, 1, 2, 2]], np.float32)
    cal = {"a": 1.0, "b": 0.0, "quality": BLOCK}
    st = _state(cal)

    def answer(quality=None):
        return build_answer(Program("describe"), board_defects(st, boxes, list, quality),
                            quality=quality, calibration=cal)
    plain = answer()
    good = answer({"residual": 0.01, "shift_x": 0})
    bad = answer({"residual": 0.4, "shift_x": 0})
    assert "image_quality" not in plain
    assert good["image_quality"]["confidence_penalty"] == 0.0 and "Warning" not in good["answer"]
    assert [d["confidence"] for d in good["defects"]] == [d["confidence"] for d in plain["defects"]]
    assert bad["image_quality"]["confidence_penalty"] > 0.5 and "Warning" in bad["answer"]
    assert [d["bbox"] for d in good["defects"]] == [d["bbox"] for d in bad["defects"]]
    assert len(bad["defects"]) == 2
    for g, b in zip(good["defects"], bad["defects"]):
        assert b["confidence"] < g["confidence"]
