"""Box geometry shared by every part of pcbedge (the one IoU): boxes are ``[x1, y1, x2, y2]``
in pixels."""
from __future__ import annotations

import numpy as np


def iou(a, b) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0.0 when the union is empty."""
    return float(iou_matrix(np.asarray([a], float), np.asarray([b], float))[0, 0])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] against every box in ``b`` [m, 4]; returns [n, m]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(hi - lo, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    # Two zero-area boxes have no meaningful overlap; 0 keeps them from ever matching.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
