"""Stage C2: make confidence fall on captures the shared preprocessing cannot repair.

Alignment (:mod:`pcbedge.data.align`) absorbs exposure drift and small template shifts; heavy
blur or noise, or a template misplaced beyond the registration search, remain. Their trace is
the residual: the fraction of pixels where test and aligned template still differ. Confidence
becomes ``sigmoid(a * logit(p) + b - c * max(0, log(residual / r0)))``: Platt's ``a, b`` stay
as fitted on clean validation boards, ``r0`` is the 95th percentile of the clean residuals
(so clean boards are untouched) and ``c`` is fitted by maximum likelihood on the reported
defects of validation boards under :data:`pcbedge.data.degrade.CALIBRATION_DEGRADATIONS`
(severities and noise fields other than the benchmark's).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.data.degrade import CALIBRATION_DEGRADATIONS
from pcbedge.data.preprocess import prepare_pair
from pcbedge.families.pcbvlm.grammar import logit_of_logp


def is_correct(d: dict, boxes: np.ndarray, types, used: set) -> bool:
    from pcbedge.geometry import iou_matrix
    if not len(boxes):
        return False
    m = iou_matrix(np.array([d["bbox"]], np.float32), boxes)[0]
    for g in np.argsort(-m):
        if m[g] > 0.33 and g not in used and DEFECT_TYPES[types[g]] == d["type"]:
            used.add(int(g))
            return True
    return False


@torch.no_grad()
def quality_records(model, boards, seed: int, degradations=CALIBRATION_DEGRADATIONS,
                    clean: bool = True) -> list[tuple[float, float, bool]]:
    """(calibrated logit without penalty, residual, correct) of every defect the board pass
    reports, on each board clean and under each degradation.
    ``boards`` hold ``img`` (uint8 [2, S, S]: test, template), ``boxes`` and ``types``."""
    a, b = model.calibration.get("a", 1.0), model.calibration.get("b", 0.0)
    conds = ([("clean", None)] if clean else []) + list(degradations.items())
    out = []
    for name, fn in conds:
        for bd in tqdm(boards, desc=f"stage C2: {name}", unit="board", leave=False):
            test, temp = bd.img[0], bd.img[1]
            if fn is not None:
                test, temp = fn(test, temp)
            x, meta = prepare_pair(test, temp, model.cfg.input_size)
            enc = model.encode_image(torch.from_numpy(x).unsqueeze(0))
            boxes = enc["region_boxes"][0].numpy()
            state, _ = model.board_pass(enc)
            used: set = set()
            for t, k, logp in state.defects:
                z = a * logit_of_logp(logp) + b      # calibrated logit, no penalty yet
                d = {"type": t, "bbox": boxes[k].tolist()}
                out.append((z, meta.quality.residual, is_correct(d, bd.boxes, bd.types, used)))
    return out


def fit_quality(records: list[tuple[float, float, bool]], clean_residuals: list[float],
                iters: int = 100) -> dict:
    """The calibration's ``quality`` block {"residual_ref", "c", ...} by 1-D Newton."""
    r0 = float(np.percentile(clean_residuals, 95)) if clean_residuals else 0.05
    r0 = max(r0, 1e-4)
    z = np.array([r[0] for r in records], np.float64)
    u = np.array([max(0.0, math.log(max(r[1], 1e-9) / r0)) for r in records])
    y = np.array([r[2] for r in records], np.float64)
    c = 0.0
    for _ in range(iters):
        q = 1 / (1 + np.exp(-(z - c * u)))
        g = float(np.sum((y - q) * u)) + 1e-3 * c     # d(-loglik)/dc
        h = float(np.sum(q * (1 - q) * u * u)) + 1e-3
        step = g / h
        c = max(0.0, c - step)                     # a poorer capture never raises confidence
        if abs(step) < 1e-8:
            break
    sel = u > 0
    return {"residual_ref": round(r0, 6), "c": round(c, 4), "n": int(len(y)),
            "n_penalised": int(sel.sum()),
            "accuracy_penalised": round(float(y[sel].mean()), 4) if sel.any() else None,
            "method": "logit - c * max(0, log(residual / residual_ref)), c by max. likelihood"}


def calibrate_quality(model, boards, seed: int) -> dict:
    """Fit and set ``model.calibration["quality"]`` on validation ``boards``; returns it."""
    from pcbedge.data.align import align_pair
    model.calibration.pop("quality", None)
    clean = [align_pair(bd.img[0], bd.img[1])[2].residual for bd in boards]
    block = fit_quality(quality_records(model, boards, seed), clean)
    model.calibration["quality"] = block
    return block
