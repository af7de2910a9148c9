"""Box geometry shared by every part of pcbedge (the one IoU): boxes are ``[x1, y1, x2, y2]``
in pixels."""
from __future__ import annotations

import numpy as np


def iou(a, b) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0.0 when the union is empty."""
    return float(iou_matrix(np.asarray([a], float), np.asarray([b], float))[0, 0])


OVERLAP_METRICS = ("iou", "iomin")


def _areas(a: np.ndarray, b: np.ndarray):
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(hi - lo, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.clip((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), 0.0, None)
    area_b = np.clip((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0.0, None)
    return inter, area_a, area_b


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] against every box in ``b`` [m, 4]; returns [n, m]."""
    inter, area_a, area_b = _areas(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    # Two zero-area boxes have no meaningful overlap; 0 keeps them from ever matching.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iomin_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller of the two areas, [n, m]: 1.0 when one box lies inside the
    other, however different their sizes (a fragment inside or astride a large box scores high
    where its IoU stays low); 0.0 where either box has no area."""
    inter, area_a, area_b = _areas(a, b)
    small = np.minimum(area_a[:, None], area_b[None, :])
    return np.divide(inter, small, out=np.zeros_like(inter), where=small > 0)


def overlap_matrix(a: np.ndarray, b: np.ndarray, metric: str = "iou") -> np.ndarray:
    """``iou_matrix`` or ``iomin_matrix`` by name (one of ``OVERLAP_METRICS``)."""
    if metric not in OVERLAP_METRICS:
        raise ValueError(f"overlap metric {metric!r} is not one of {OVERLAP_METRICS}")
    return iou_matrix(a, b) if metric == "iou" else iomin_matrix(a, b)
