"""The answer language of the reference PCB VLM, its constrained decoding state and rendering.

An answer is two passes (program.py): the question's *program* (intent, types, scope, order),
and the *board pass* below, decoded under a fixed question, which reports every defect of the
board; the answer then points at the board-pass regions the program admits, in its order.
The board pass's grammar:

Pure numpy and torch-free: the ONNX runner uses it on device. The token ids come from the
manifest's ``grammar`` block (see :func:`grammar_spec`), so the runner never guesses them.

    answer  := INTENT FILTER (REGION TYPE)* EOS      |  <q_unsupported> EOS
    INTENT  := <q_where> | <q_count> | <q_exists> | <q_describe>
    FILTER  := <f_all> | <f_open> | ... | <f_pin_hole>
    TYPE    := <t_open> | ... (only the filter's type unless <f_all>)
    REGION  := <r_k>, k a proposal of the vision head with score >= min_region_score that has
               not been reported yet (each proposal at most once)

The pointer comes first: at each REGION step the decoder chooses "one more defect among the
proposals not yet reported, or stop", then TYPE classifies the region it just pointed at.
Region tokens carry no index, so training targets the whole set of true regions not yet
reported (set-based pointer loss); decoding lets the decoder pick any unreported one (most
probable first). Two spec fields shape that step:

* ``region_prior_weight`` w and ``region_prior_center`` c: under the ``all`` filter each
  pointer logit gets ``w * (logit(score_k) - logit(c))`` of the defect head added before the
  choice (a product of experts: the language side and the evidence head vote together on
  "which region next, or stop"); ``<eos>`` gets nothing, so a proposal scoring above c is
  pushed towards being reported and one below it towards stopping. Under a type filter the
  decoder decides alone (the head's score is class-agnostic). w = 0: decoder only; c
  defaults to 0.5 (no offset).
* ``region_overlap_max``: a proposal whose box overlaps an already-reported region's box by
  more than this IoU may not be reported (the same place is never reported twice, as the same
  proposal is not; the head sometimes puts two peaks on one large defect). Needs the boxes
  (``DecodeState.region_boxes``); 1.0 = off. ``region_overlap_metric`` says which overlap:
  ``"iou"`` (default) or ``"iomin"``, intersection over the smaller box, which also catches a
  small fragment lying inside or astride a large reported box (its IoU with it stays low).
* ``region_confidence``: ``"softmax"`` reads a region's raw confidence as its share of the
  step's probability; ``"margin"`` as ``sigmoid(logit_k - logit_eos)``, "report it rather than
  stop", which does not shrink when many true regions remain. Platt scaling then calibrates it.

A REGION token points at a proposal of the defect head: the box comes from the visual evidence,
so the decoder can omit a defect but never invent a box that nothing in the image supports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pcbedge.data.query import MAX_SLOTS, ORDERS, SCOPES, Program
from pcbedge.families.pcbvlm.program import allowed_logits, program_spec
from pcbedge.geometry import overlap_matrix

DEFECT_TYPES = ("open", "short", "mousebite", "spur", "spurious_copper", "pin_hole")
INTENTS = ("where", "count", "exists", "describe", "verdict", "unsupported")
SPECIAL_TOKENS = (["[PAD]", "[UNK]", "<bos>", "<sep>", "<eos>"]
                  + [f"<q_{k}>" for k in INTENTS]
                  + ["<f_all>"] + [f"<f_{t}>" for t in DEFECT_TYPES]
                  + [f"<t_{t}>" for t in DEFECT_TYPES]
                  + ["<prog>"] + [f"<s_{s}>" for s in SCOPES] + [f"<o_{o}>" for o in ORDERS]
                  + [f"<n_{i}>" for i in range(MAX_SLOTS)])


REGION_CONFIDENCE = ("softmax", "margin")
# the board pass's fixed question (a training phrasing of "describe"): see program.py
CANONICAL_QUESTION = "list every defect."


def grammar_spec(vocab: dict[str, int], num_regions: int, min_region_score: float,
                 calibration: dict, *, region_prior_weight: float = 0.0,
                 region_prior_center: float = 0.5, region_overlap_max: float = 1.0,
                 region_confidence: str = "softmax", region_overlap_metric: str = "iou") -> dict:
    """The JSON block a manifest carries so any runner can decode this answer language."""
    return {
        "kind": "pcbvlm-pointer-v3",
        "canonical_question": CANONICAL_QUESTION,
        "program": program_spec(vocab),
        "bos": vocab["<bos>"], "sep": vocab["<sep>"], "eos": vocab["<eos>"], "pad": vocab["[PAD]"],
        "intents": {k: vocab[f"<q_{k}>"] for k in INTENTS},
        "filters": {"all": vocab["<f_all>"], **{t: vocab[f"<f_{t}>"] for t in DEFECT_TYPES}},
        "types": {t: vocab[f"<t_{t}>"] for t in DEFECT_TYPES},
        "region_offset": vocab["<r_0>"], "num_regions": num_regions,
        "min_region_score": min_region_score,
        "region_prior_weight": float(region_prior_weight),
        "region_prior_center": float(region_prior_center),
        "region_overlap_max": float(region_overlap_max),
        "region_overlap_metric": region_overlap_metric,
        "region_confidence": region_confidence,
        "calibration": calibration,
    }


@dataclass
class DecodeState:
    """Where constrained greedy decoding stands; ``allowed`` gives the logit mask."""
    spec: dict
    region_scores: np.ndarray            # [K] evidence score of each proposal
    region_boxes: np.ndarray | None = None   # [K, 4] boxes (any pixel frame), for the overlap rule
    phase: str = "intent"                # intent -> filter -> region <-> type -> done
    intent: str | None = None
    filter: str | None = None
    last_region: int = -1
    emitted: set = field(default_factory=set)   # regions already reported
    pending_region: int = -1
    pending_logp: float = 0.0
    defects: list = field(default_factory=list)   # (type, region_index, logp)
    done: bool = False

    def vocab_size(self) -> int:
        return self.spec["region_offset"] + self.spec["num_regions"]

    def allowed(self) -> np.ndarray:
        s = self.spec
        ids: list[int]
        if self.phase == "intent":
            ids = list(s["intents"].values())
        elif self.phase == "filter":
            ids = [s["eos"]] if self.intent == "unsupported" else list(s["filters"].values())
        elif self.phase == "region":
            k = np.arange(len(self.region_scores))
            ok = ~np.isin(k, list(self.emitted)) & (self.region_scores >= s["min_region_score"])
            ok &= ~self._overlaps_reported()
            ids = [s["eos"]] + list(s["region_offset"] + k[ok])
        else:  # type of the region just reported
            types = DEFECT_TYPES if self.filter == "all" else (self.filter,)
            ids = [s["types"][t] for t in types]
        mask = np.zeros(self.vocab_size(), dtype=bool)
        mask[ids] = True
        return mask

    def step(self, logits: np.ndarray) -> int:
        """Pick the best allowed token from ``logits`` [V+K], advance, return the token id."""
        ids = np.flatnonzero(self.allowed())
        z = allowed_logits(logits, ids)
        if self.phase == "region":
            z = z + self._region_prior(ids)
        j = int(np.argmax(z))
        tok = int(ids[j])
        if (self.phase == "region" and tok != self.spec["eos"]
                and self.spec.get("region_confidence") == "margin"):
            logp = _log_sigmoid(float(z[j] - z[ids == self.spec["eos"]][0]))
        else:
            logp = float(z[j] - _logsumexp(z))
        self.advance(tok, logp)
        return tok

    def _overlaps_reported(self) -> np.ndarray:
        """[K] True where a proposal's box overlaps a reported region's box above
        ``region_overlap_max`` by ``region_overlap_metric`` (never the reported ones themselves:
        they are excluded anyway)."""
        k = len(self.region_scores)
        limit = float(self.spec.get("region_overlap_max", 1.0))
        if self.region_boxes is None or limit >= 1.0 or not self.emitted:
            return np.zeros(k, dtype=bool)
        b = np.nan_to_num(np.asarray(self.region_boxes, dtype=np.float64).reshape(k, 4))
        metric = self.spec.get("region_overlap_metric", "iou")
        return (overlap_matrix(b, b[sorted(self.emitted)], metric) > limit).any(axis=1)

    def _region_prior(self, ids: np.ndarray) -> np.ndarray:
        """Weight x logit(evidence score) for each allowed pointer, 0 for <eos>: the decoder's
        pointer and the defect head vote together on "which region next, or stop". Only when
        every type is asked for: the head's score is class-agnostic (the peak of its class-max
        heatmap), so under a type filter it would push the decoder to report a defect of
        another type as the asked one; there the decoder decides alone."""
        w = float(self.spec.get("region_prior_weight", 0.0) or 0.0)
        out = np.zeros(len(ids))
        if w and self.filter == "all":
            reg = ids >= self.spec["region_offset"]
            k = ids[reg] - self.spec["region_offset"]
            s = np.clip(np.nan_to_num(self.region_scores[k].astype(np.float64), nan=0.5),
                        1e-6, 1 - 1e-6)
            c = min(max(float(self.spec.get("region_prior_center", 0.5)), 1e-6), 1 - 1e-6)
            out[reg] = w * (np.log(s / (1 - s)) - math.log(c / (1 - c)))
        return out

    def advance(self, tok: int, logp: float = 0.0) -> None:
        s = self.spec
        if tok == s["eos"]:
            self.phase, self.done = "done", True
        elif self.phase == "intent":
            self.intent = _key_of(s["intents"], tok)
            self.phase = "filter"
        elif self.phase == "filter":
            self.filter = _key_of(s["filters"], tok)
            self.phase = "region"
        elif self.phase == "region":
            k = tok - s["region_offset"]
            if not 0 <= k < len(self.region_scores):
                raise ValueError(f"token {tok} is not a region pointer")
            self.pending_region, self.pending_logp = k, logp
            self.last_region = k
            self.emitted.add(k)
            self.phase = "type"
        elif self.phase == "type":
            self.defects.append((_key_of(s["types"], tok), self.pending_region,
                                 self.pending_logp + logp))
            self.phase = "region"
        else:
            raise ValueError(f"token {tok} after the answer ended")


def _key_of(d: dict, tok: int) -> str:
    for k, v in d.items():
        if v == tok:
            return k
    raise ValueError(f"token {tok} is not one of {sorted(d.values())}")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def _logsumexp(z: np.ndarray) -> float:
    m = float(np.max(z))
    return m + math.log(float(np.sum(np.exp(z - m))))


def quality_penalty(quality: dict | None, calibration: dict) -> float:
    """How much an imperfect capture lowers the confidence logit: ``c * log(residual / r0)``
    above the reference residual ``r0`` (the calibration's ``quality`` block), else 0. The
    residual is the fraction of pixels where test and aligned template still differ
    (:class:`pcbedge.data.align.PairQuality`): clean aligned boards stay below ``r0``."""
    q = calibration.get("quality") if isinstance(calibration, dict) else None
    if not quality or not q:
        return 0.0
    r = float(quality.get("residual", 0.0) or 0.0)
    if not math.isfinite(r) or r <= q["residual_ref"]:
        return 0.0
    return float(q["c"]) * math.log(r / q["residual_ref"])


LOGIT_CAP = 50.0


def logit_of_logp(logp: float) -> float:
    """logit(p) from log p without rounding p to 1 first (a margin of 30 stays 30), capped at
    +-LOGIT_CAP."""
    if not math.isfinite(logp):
        return -LOGIT_CAP if logp < 0 or math.isnan(logp) else LOGIT_CAP
    if logp >= 0.0:
        return LOGIT_CAP
    q = -math.expm1(logp)                       # 1 - p, exact for p near 1
    z = logp - math.log(q) if q > 0 else LOGIT_CAP
    return max(-LOGIT_CAP, min(LOGIT_CAP, z))


def calibrate(logp: float, calibration: dict, penalty: float = 0.0) -> float:
    """Raw joint log-probability of (type, region) -> calibrated confidence (Platt on logit,
    minus the image-quality penalty)."""
    z = logit_of_logp(logp)
    a, b = calibration.get("a", 1.0), calibration.get("b", 0.0)
    return 1.0 / (1.0 + math.exp(-(a * z + b - penalty)))


def board_defects(state: DecodeState, boxes: np.ndarray, to_original,
                  quality: dict | None = None) -> list[dict]:
    """The board pass's defects as dicts in original pixels, confidences calibrated (and
    lowered for a poor capture by ``quality``, PairQuality as a dict)."""
    cal = state.spec.get("calibration", {})
    penalty = quality_penalty(quality, cal)
    out = []
    for t, k, logp in state.defects:
        x1, y1, x2, y2 = (round(float(v), 1) for v in to_original(boxes[k]))
        out.append({"type": t, "bbox": [x1, y1, x2, y2],
                    "center": [round((x1 + x2) / 2, 1), round((y1 + y2) / 2, 1)],
                    "confidence": round(calibrate(logp, cal, penalty), 4), "region": int(k)})
    return out


def build_answer(program: Program, defects: list[dict], *, complete: bool = True,
                 quality: dict | None = None, calibration: dict | None = None) -> dict:
    """The answer JSON: ``defects`` are the regions the program admitted, in its order."""
    ans = {"answer": render_sentence(program, defects)
           + ("" if complete else " (answer cut at the token limit)"),
           "intent": program.intent,
           "filter": program.types[0] if len(program.types) == 1 else (
               "all" if not program.types else "several"),
           "types": list(program.types) or list(DEFECT_TYPES),
           "scope": program.scope, "scope_args": program.args(), "order": program.order,
           "count": len(defects), "defects": defects, "complete": complete}
    if program.intent == "verdict":
        ans["verdict"] = "fail" if defects else "pass"
    if quality is not None:
        penalty = quality_penalty(quality, calibration or {})
        ans["image_quality"] = dict(quality, confidence_penalty=round(penalty, 4))
        if penalty > 0.5:
            ans["answer"] += (f" Warning: the board and its template still differ on "
                              f"{100 * quality['residual']:.1f}% of the pixels after alignment "
                              "(blur, noise or a misplaced template?); confidences are lowered.")
    return ans


def _what(types: tuple, n: int) -> str:
    noun = "defect" if n == 1 else "defects"
    if not types:
        return noun
    if len(types) == 1:
        return f"{noun} of type {types[0]}"
    return f"{noun} of types {', '.join(types[:-1])} and {types[-1]}"


def _one(d: dict) -> str:
    b = d["bbox"]
    return (f"{d['type']} at ({b[0]:.0f}, {b[1]:.0f})-({b[2]:.0f}, {b[3]:.0f}), "
            f"confidence {d['confidence']:.2f}")


def render_sentence(program: Program, defects: list) -> str:
    """One sentence per answer; defect types spelled exactly as in the JSON."""
    if program.intent == "unsupported":
        return ("I can only answer about these defect types: " + ", ".join(DEFECT_TYPES)
                + " (where, how many, is there, list, pass or fail, in a region, nearest to a "
                  "point, largest or smallest).")
    n, where = len(defects), program.scope_text()
    what = _what(program.types, n)
    listing = "; ".join(_one(d) for d in defects)
    lead = ""
    if n and program.order != "reading":
        p = program.point()
        sup = {"nearest": f"nearest to ({p[0]:g}, {p[1]:g})" if p else "nearest",
               "largest": "largest", "smallest": "smallest"}[program.order]
        lead = f"The {sup} is the {_one(defects[0])}. "
    if program.intent == "verdict":
        return (f"Fail: {n} {what}{where}: {listing}." if n
                else f"Pass: no {_what(program.types, 2)} found{where}.")
    if n == 0:
        none = f"No {_what(program.types, 2)} found{where}."
        return ("No. " + none) if program.intent == "exists" else none
    if program.intent == "count":
        return lead + f"There {'is' if n == 1 else 'are'} {n} {what}{where}: {listing}."
    if program.intent == "exists":
        return lead + f"Yes, {n} {what}{where}: {listing}."
    return lead + f"Found {n} {what}{where}: {listing}."
