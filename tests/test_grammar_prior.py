"""The region step's evidence prior and margin confidence (grammar.py, torch-free)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pcbedge.families.pcbvlm.grammar import DecodeState, grammar_spec
from pcbedge.families.pcbvlm.tokenizer import build_tokenizer

K = 4


def _spec(**kw):
    vocab = build_tokenizer(["where is the short"], K).get_vocab(with_added_tokens=True)
    return grammar_spec(vocab, K, 0.05, {"a": 1.0, "b": 0.0}, **kw)


def _at_region_phase(spec, scores):
    st = DecodeState(spec, np.asarray(scores, np.float32))
    st.advance(spec["intents"]["describe"])
    st.advance(spec["filters"]["all"])
    assert st.phase == "region"
    return st


def _logits(spec, eos: float, regions: list[float]) -> np.ndarray:
    z = np.full(spec["region_offset"] + K, -50.0)
    z[spec["eos"]] = eos
    z[spec["region_offset"]:] = regions
    return z


def test_defaults_keep_the_decoder_alone():
    spec = _spec()
    assert spec["region_prior_weight"] == 0.0 and spec["region_confidence"] == "softmax"
    st = _at_region_phase(spec, [0.9, 0.1, 0.9, 0.9])
    tok = st.step(_logits(spec, 0.0, [1.0, 2.0, -9, -9]))
    assert tok == spec["region_offset"] + 1       # the decoder's favourite, despite its score


def test_evidence_prior_can_overrule_a_weak_pointer_preference():
    spec = _spec(region_prior_weight=2.0)
    st = _at_region_phase(spec, [0.9, 0.1, 0.9, 0.9])
    tok = st.step(_logits(spec, 0.0, [1.0, 2.0, -9, -9]))
    assert tok == spec["region_offset"] + 0       # 1 + 2*logit(0.9) > 2 + 2*logit(0.1)


def test_prior_never_adds_to_eos_and_low_evidence_makes_it_stop():
    spec = _spec(region_prior_weight=3.0)
    st = _at_region_phase(spec, [0.06, 0.06, 0.06, 0.06])
    assert st.step(_logits(spec, 0.0, [2.0, 2.0, 2.0, 2.0])) == spec["eos"]
    assert st.done


def test_margin_confidence_does_not_shrink_with_many_true_regions():
    for conf, many_lower in (("softmax", True), ("margin", False)):
        spec = _spec(region_confidence=conf)
        got = []
        for regions in ([3.0, -9, -9, -9], [3.0, 3.0, 3.0, 3.0]):
            st = _at_region_phase(spec, [0.9] * K)
            st.step(_logits(spec, 0.0, regions))
            got.append(st.pending_logp)
        if many_lower:
            assert got[1] < got[0] - 1.0
        else:
            assert got[1] == pytest.approx(got[0]) == pytest.approx(-math.log1p(math.exp(-3.0)))


def test_degenerate_scores_and_logits_still_decode():
    spec = _spec(region_prior_weight=5.0, region_confidence="margin")
    st = _at_region_phase(spec, [np.nan, 1.0, 0.0, 0.5])
    z = _logits(spec, np.nan, [np.inf, -np.inf, np.nan, 0.0])
    for _ in range(2 * K + 2):
        if st.done:
            break
        st.step(z if st.phase == "region" else np.zeros_like(z))
    assert all(math.isfinite(lp) for _, _, lp in st.defects)


def test_logit_of_logp_keeps_large_margins():
    from pcbedge.families.pcbvlm.grammar import LOGIT_CAP, _log_sigmoid, logit_of_logp
    for m in (-20.0, -3.0, 0.0, 2.5, 13.0, 30.0):
        assert logit_of_logp(_log_sigmoid(m)) == pytest.approx(m, abs=1e-6)
    assert logit_of_logp(0.0) == LOGIT_CAP and logit_of_logp(float("-inf")) == -LOGIT_CAP
    assert logit_of_logp(float("nan")) == -LOGIT_CAP


def test_platt_fit_stays_finite_on_nearly_separable_margins():
    pytest.importorskip("torch")
    from pcbedge.families.pcbvlm.grammar import _log_sigmoid
    from pcbedge.families.pcbvlm.model.train_lm import fit_platt
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.normal(60, 15, 900), rng.normal(5, 5, 100)])
    y = np.concatenate([rng.random(900) < 0.99, rng.random(100) < 0.3])
    fit = fit_platt([_log_sigmoid(float(v)) for v in m], list(y))
    assert 0 < fit["a"] < 1 and math.isfinite(fit["b"])
    conf = 1 / (1 + np.exp(-(fit["a"] * m + fit["b"])))
    assert abs(conf.mean() - y.mean()) < 0.02           # calibrated in the large


def test_prior_is_not_applied_under_a_type_filter():
    spec = _spec(region_prior_weight=8.0)
    st = DecodeState(spec, np.asarray([0.95, 0.95, 0.95, 0.95], np.float32))
    st.advance(spec["intents"]["where"])
    st.advance(spec["filters"]["short"])
    # the decoder says "no short here": strong evidence of *some* defect must not overrule it
    assert st.step(_logits(spec, 2.0, [0.0, 0.0, 0.0, 0.0])) == spec["eos"]


def test_prior_center_moves_the_report_or_stop_line():
    # a proposal scored 0.3 with a decoder undecided between it and <eos>: with the neutral
    # point at 0.5 the head votes "stop", with it at 0.2 the head votes "report"
    for center, want_eos in ((0.5, True), (0.2, False)):
        spec = _spec(region_prior_weight=4.0, region_prior_center=center)
        assert spec["region_prior_center"] == center
        st = _at_region_phase(spec, [0.3, 0.01, 0.01, 0.01])
        tok = st.step(_logits(spec, 0.0, [0.0, -9, -9, -9]))
        assert (tok == spec["eos"]) is want_eos
        if not want_eos:
            assert tok == spec["region_offset"] + 0


def test_prior_center_is_ignored_under_a_type_filter():
    spec = _spec(region_prior_weight=4.0, region_prior_center=0.01)
    st = DecodeState(spec, np.asarray([0.3] * K, np.float32))
    st.advance(spec["intents"]["where"])
    st.advance(spec["filters"]["short"])
    assert st.step(_logits(spec, 1.0, [0.0] * K)) == spec["eos"]   # the decoder alone


def test_overlap_rule_never_reports_the_same_place_twice():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    got = {}
    for limit in (1.0, 0.5):
        spec = _spec(region_overlap_max=limit)
        st = DecodeState(spec, np.asarray([0.9] * K, np.float32), boxes)
        st.advance(spec["intents"]["describe"])
        st.advance(spec["filters"]["all"])
        z = _logits(spec, -5.0, [4.0, 3.0, 2.0, 1.0])   # the decoder wants every region, in order
        for _ in range(2 * K + 2):
            if st.done:
                break
            st.step(z if st.phase == "region" else np.zeros_like(z))
        got[limit] = [k for _, k, _ in st.defects]
    assert got[1.0] == [0, 1, 2, 3]
    assert got[0.5] == [0, 2]          # 1 (IoU 0.68) and 3 (same box) repeat region 0
    # a small fragment inside a large reported box: IoU misses it, intersection over the
    # smaller box does not
    frag = np.array([[0, 0, 40, 40], [5, 5, 15, 15], [50, 50, 60, 60], [70, 70, 80, 80]],
                    np.float32)
    for metric, want in (("iou", [0, 1, 2, 3]), ("iomin", [0, 2, 3])):
        spec = _spec(region_overlap_max=0.5, region_overlap_metric=metric)
        st = DecodeState(spec, np.asarray([0.9] * K, np.float32), frag)
        st.advance(spec["intents"]["describe"])
        st.advance(spec["filters"]["all"])
        z = _logits(spec, -5.0, [4.0, 3.0, 2.0, 1.0])
        for _ in range(2 * K + 2):
            if st.done:
                break
            st.step(z if st.phase == "region" else np.zeros_like(z))
        assert [k for _, k, _ in st.defects] == want, metric
    # without boxes the rule is off whatever the spec says
    spec = _spec(region_overlap_max=0.5)
    st = _at_region_phase(spec, [0.9] * K)
    assert st._overlaps_reported().sum() == 0


def test_model_config_refuses_an_unknown_overlap_metric():
    from pcbedge.errors import ModelError
    from pcbedge.families.pcbvlm.model.config import PcbVlmConfig
    d = PcbVlmConfig(region_overlap_metric="iomin").to_dict()
    assert PcbVlmConfig.from_dict(d).region_overlap_metric == "iomin"
    d["region_overlap_metric"] = "iomax"
    with pytest.raises(ModelError, match="region_overlap_metric is 'iomax'"):
        PcbVlmConfig.from_dict(d)
    del d["region_overlap_metric"]   # configs written before it existed read as IoU
    assert PcbVlmConfig.from_dict(d).region_overlap_metric == "iou"
