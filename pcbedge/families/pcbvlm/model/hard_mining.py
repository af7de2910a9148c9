"""Stage A's hard-defect sampling: crops centred on the training defects the head still scores low.

The reference detector under-fits a few kinds of defect on its own training boards: after hours of
stage A it still reports only 82-90 % of group 20085's training boards with the right count, most
of the misses thin-trace mousebites of a few pixels, while most defects score above 0.9 at their
centre. Uniform crops spend almost every step on what is learned. This sampler keeps, for every
training defect, a running estimate of its *difficulty* -- one minus the head's probability for
its type at its centre cell, read from the training forward pass itself at no extra cost -- and
draws a share (``FinetuneConfig.hard_mining``) of the crops centred on a defect picked in
proportion to ``difficulty + floor``. Unseen defects start at difficulty 1, so every defect is
looked at before the estimates steer. The state (``state_dict``) travels in the stage's resume
checkpoint, so a resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import bisect
import random

import numpy as np
import torch


class DefectDifficulty:
    def __init__(self, n_defects: list[int], floor: float = 0.05, momentum: float = 0.7):
        """``n_defects[i]``: how many defects board i has (boards without defects are never
        picked)."""
        self.index = [(b, j) for b, n in enumerate(n_defects) for j in range(n)]
        self._first = np.concatenate([[0], np.cumsum(n_defects)]).astype(int)
        self.difficulty = np.ones(len(self.index), np.float64)
        self.floor, self.momentum = float(floor), float(momentum)

    def __len__(self) -> int:
        return len(self.index)

    def pick(self, rng: random.Random) -> tuple[int, int]:
        """(board, defect) drawn in proportion to difficulty + floor, from ``rng`` only."""
        cum = np.cumsum(self.difficulty + self.floor)
        i = bisect.bisect_right(cum.tolist(), rng.random() * cum[-1])
        return self.index[min(i, len(self.index) - 1)]

    def update(self, board: int, defect: int, prob: float) -> None:
        i = self._first[board] + defect
        self.difficulty[i] = self.momentum * self.difficulty[i] + (1 - self.momentum) * (1 - prob)

    def state_dict(self) -> dict:
        return {"difficulty": torch.from_numpy(self.difficulty.copy())}

    def load_state_dict(self, st: dict) -> None:
        d = st["difficulty"].numpy()
        if d.shape != self.difficulty.shape:
            raise ValueError(f"difficulty state holds {d.shape[0]} defects, "
                             f"the training boards {self.difficulty.shape[0]}")
        self.difficulty = d.astype(np.float64).copy()


def find_focus(boxes: np.ndarray, expected: np.ndarray | None, min_iou: float = 0.7) -> int:
    """Index of the crop's box that is the picked defect (its expected box after the crop and
    scaling, matched by IoU, since the layout augmentation may drop or add boxes), or -1."""
    if expected is None or not len(boxes):
        return -1
    x1 = np.maximum(boxes[:, 0], expected[0])
    y1 = np.maximum(boxes[:, 1], expected[1])
    x2 = np.minimum(boxes[:, 2], expected[2])
    y2 = np.minimum(boxes[:, 3], expected[3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    ea = (expected[2] - expected[0]) * (expected[3] - expected[1])
    iou = inter / np.maximum(area + ea - inter, 1e-6)
    j = int(np.argmax(iou))
    return j if iou[j] >= min_iou else -1


def centre_prob(heat_logits: torch.Tensor, i: int, box, cls: int, stride: int) -> float:
    """The head's probability for class ``cls`` at the centre cell of ``box`` in crop i (the cell
    its CenterNet target peaks on)."""
    h, w = heat_logits.shape[-2:]
    ix = int(min(max((box[0] + box[2]) / 2 / stride, 0), w - 1))
    iy = int(min(max((box[1] + box[3]) / 2 / stride, 0), h - 1))
    return float(torch.sigmoid(heat_logits[i, cls, iy, ix].detach()))
