"""Layout-changing augmentations (issue 17): scale and line-width jitter, and defects of every
type pasted onto boards of any design. Each takes the board pair as a uint8 [2, H, W] array
(test, template) with its [n, 4] boxes (x1, y1, x2, y2) and [n] type ids, and changes both
images alike, so a test/template difference exists only where a labelled defect is.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

from pcbedge.data.degrade import morph3
from pcbedge.families.pcbvlm.model.augment import dihedral


def scale_pair(img: np.ndarray, boxes: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Both images resized by ``s`` (bilinear), the boxes with them: the board's traces, pads
    and defects all grow or shrink together, as a board imaged at another resolution would."""
    h, w = img.shape[-2:]
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.stack([np.asarray(Image.fromarray(c).resize((nw, nh), Image.BILINEAR), np.uint8)
                    for c in img])
    b = boxes.astype(np.float32) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    return out, b.reshape(-1, 4)


def line_width(img: np.ndarray, delta: int) -> np.ndarray:
    """Bright areas grown by ``delta`` pixels on each side (delta > 0) or shrunk (delta < 0),
    on both images alike: a design drawn with other line widths (DeepPCB's copper is dark, so
    delta > 0 narrows it; the draw is symmetric)."""
    op = np.maximum if delta > 0 else np.minimum
    out = img
    for _ in range(abs(delta)):
        out = morph3(out, op)
    return out


def still_different(img: np.ndarray, boxes: np.ndarray, types: np.ndarray, level: int = 64):
    """The boxes whose test and template still differ somewhere inside (an eroded hair-thin
    spur can vanish from both): a label is kept only where a defect is still to be seen."""
    diff = np.abs(img[0].astype(np.int16) - img[1]) >= level
    keep = np.array([diff[int(np.floor(y1)):int(np.ceil(y2)),
                          int(np.floor(x1)):int(np.ceil(x2))].any()
                     for x1, y1, x2, y2 in boxes], bool)
    return (boxes[keep], types[keep]) if len(boxes) else (boxes, types)


class DefectBank:
    """Every training defect as a small (test, template) patch around its box, to paste into
    other boards: the pair's difference moves with the patch, so the pasted defect keeps its
    own copper context and the seam is the same in both images (no difference there)."""

    def __init__(self, boards, margin: int = 6, max_side: int = 96):
        self.patches: dict[int, list] = {}
        for bd in boards:
            H, W = bd.img.shape[-2:]
            for box, t in zip(bd.boxes, bd.types):
                x1 = int(max(0, np.floor(box[0]) - margin))
                y1 = int(max(0, np.floor(box[1]) - margin))
                x2 = int(min(W, np.ceil(box[2]) + margin))
                y2 = int(min(H, np.ceil(box[3]) + margin))
                if x2 - x1 > max_side or y2 - y1 > max_side or x2 <= x1 or y2 <= y1:
                    continue
                rel = (box - np.array([x1, y1, x1, y1], np.float32)).astype(np.float32)
                self.patches.setdefault(int(t), []).append((bd.img[:, y1:y2, x1:x2].copy(), rel))

    def __len__(self) -> int:
        return sum(len(v) for v in self.patches.values())

    def sample(self, rng: random.Random):
        """A patch of a type drawn uniformly (every type as often, whatever its frequency)."""
        t = rng.choice(sorted(self.patches))
        patch, rel = rng.choice(self.patches[t])
        return patch, rel, t


def _overlaps(box: np.ndarray, boxes: np.ndarray, gap: float) -> bool:
    if not len(boxes):
        return False
    return bool(np.any((boxes[:, 0] < box[2] + gap) & (boxes[:, 2] > box[0] - gap)
                       & (boxes[:, 1] < box[3] + gap) & (boxes[:, 3] > box[1] - gap)))


def paste_defects(img: np.ndarray, boxes: np.ndarray, types: np.ndarray, bank: DefectBank,
                  rng: random.Random, n: int, gap: float = 8.0):
    """Up to ``n`` bank patches, each under a random dihedral transform (patch and box alike),
    pasted at random places of ``img`` (a crop), never within ``gap`` px of a box already there.
    Returns the new image, boxes and types."""
    img = img.copy()
    boxes, types = boxes.astype(np.float32).reshape(-1, 4), np.asarray(types, np.int64)
    H, W = img.shape[-2:]
    for _ in range(n):
        patch, rel, t = bank.sample(rng)
        patch, rel = dihedral(patch, rel[None], rng.randrange(8))
        ph, pw = patch.shape[-2:]
        if ph >= H or pw >= W:
            continue
        for _try in range(10):
            x0, y0 = rng.randrange(W - pw + 1), rng.randrange(H - ph + 1)
            box = rel[0] + np.array([x0, y0, x0, y0], np.float32)
            # the whole patch, not only its box, stays clear of other defects
            if not _overlaps(np.array([x0, y0, x0 + pw, y0 + ph], np.float32), boxes, gap):
                img[:, y0:y0 + ph, x0:x0 + pw] = patch
                boxes = np.concatenate([boxes, box[None]])
                types = np.concatenate([types, [t]])
                break
    return img, boxes, types
