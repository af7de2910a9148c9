"""Layout-changing augmentations: scale and line-width jitter, defects pasted across boards."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np

from pcbedge.families.pcbvlm.model.augment_layout import (DefectBank, line_width, paste_defects,
                                                          scale_pair, still_different)
from pcbedge.families.pcbvlm.model.train import FinetuneConfig, sample_crop


def _board(seed: int = 0, size: int = 320):
    """A template of 3-px horizontal traces every 20 px; the test adds a short (a bar across
    two traces), cuts an open and adds a 1-px-wide spur. Boxes are where the two differ."""
    temp = np.zeros((size, size), np.uint8)
    for y in range(10, size - 10, 20):
        temp[y:y + 3, 10:size - 10] = 255
    test = temp.copy()
    test[50:73, 100:106] = 255                 # short between the traces at y=50 and y=70
    test[110:113, 200:208] = 0                 # open in the trace at y=110
    test[150:160, 60:61] = 255                 # hair-thin spur off the trace at y=150
    boxes = np.array([[100, 50, 106, 73], [200, 110, 208, 113], [60, 150, 61, 160]], np.float32)
    return SimpleNamespace(img=np.stack([test, temp]), boxes=boxes,
                           types=np.array([1, 0, 3], np.int64))


def _diff_outside(img: np.ndarray, boxes: np.ndarray, pad: int) -> int:
    d = np.abs(img[0].astype(np.int16) - img[1]) >= 64
    for x1, y1, x2, y2 in boxes:
        y0, x0 = max(0, int(y1) - pad), max(0, int(x1) - pad)
        d[y0:int(np.ceil(y2)) + pad, x0:int(np.ceil(x2)) + pad] = 0
    return int(d.sum())


def test_scale_moves_boxes_with_the_pixels():
    bd = _board()
    out, b = scale_pair(bd.img, bd.boxes, 1.5)
    assert out.shape == (2, 480, 480)
    np.testing.assert_allclose(b[0], [150, 75, 159, 109.5])
    ys, xs = np.nonzero(np.abs(out[0].astype(np.int16) - out[1]) >= 128)
    sel = (xs > 140) & (xs < 170) & (ys > 60) & (ys < 120)
    assert abs(xs[sel].min() - 150) <= 1 and abs(xs[sel].max() + 1 - 159) <= 1
    assert _diff_outside(out, b, 2) == 0


def test_line_width_changes_both_images_alike():
    bd = _board()
    wide, thin = line_width(bd.img, 1), line_width(bd.img, -1)
    col = 30  # a trace away from every defect: 3 px, then 5, then 1
    assert (bd.img[1, :20, col] > 0).sum() == 3
    assert (wide[1, :20, col] > 0).sum() == 5 and (thin[1, :20, col] > 0).sum() == 1
    assert _diff_outside(wide, bd.boxes, 1) == 0 and _diff_outside(thin, bd.boxes, 1) == 0


def test_an_eroded_away_defect_loses_its_label():
    bd = _board()
    thin = line_width(bd.img, -1)
    b, t = still_different(thin, bd.boxes, bd.types)
    assert t.tolist() == [1, 0]           # the 1-px spur vanished from both images: no label
    b, t = still_different(bd.img, bd.boxes, bd.types)
    assert t.tolist() == [1, 0, 3]


def test_pasted_defects_carry_their_difference_and_never_overlap():
    src, dst = _board(), _board()
    dst.img[0] = dst.img[1]               # a clean board of "another design"
    bank = DefectBank([src])
    assert len(bank) == 3 and sorted(bank.patches) == [0, 1, 3]
    rng = random.Random(3)
    img, boxes, types = paste_defects(dst.img, np.zeros((0, 4), np.float32),
                                      np.zeros(0, np.int64), bank, rng, 4)
    assert 1 <= len(boxes) <= 4 and len(types) == len(boxes)
    assert _diff_outside(img, boxes, 8) == 0          # differences only at the pasted defects
    for x1, y1, x2, y2 in boxes:                       # and each pasted box holds one
        d = np.abs(img[0, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].astype(np.int16)
                   - img[1, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))])
        assert d.max() >= 128
    for i in range(len(boxes)):                        # 8 px apart, patch margins included
        for j in range(i + 1, len(boxes)):
            a, c = boxes[i], boxes[j]
            assert a[2] <= c[0] or c[2] <= a[0] or a[3] <= c[1] or c[3] <= a[1]


def test_bank_draws_every_type_alike():
    bank = DefectBank([_board()])
    rng = random.Random(0)
    seen = [bank.sample(rng)[2] for _ in range(300)]
    assert {t: seen.count(t) for t in set(seen)}.keys() == {0, 1, 3}
    assert min(seen.count(t) for t in (0, 1, 3)) > 70


def test_sample_crop_with_every_layout_augmentation():
    bd = _board()
    fc = FinetuneConfig(scale_jitter=0.25, p_line=1.0, p_paste=1.0)
    bank = DefectBank([_board()])
    rng = random.Random(1)
    for _ in range(20):
        x, b, t = sample_crop(rng, bd, 128, fc, bank)
        assert x.shape == (3, 128, 128) and len(b) == len(t)
        assert (b >= 0).all() and (b <= 128).all()
        img = np.round(x[:2] * 255).astype(np.uint8)
        assert _diff_outside(img, b, 3) == 0


def test_layout_augmentation_is_off_by_default():
    bd = _board()
    x1, b1, _ = sample_crop(random.Random(5), bd, 128)
    x2, b2, _ = sample_crop(random.Random(5), bd, 128, FinetuneConfig(), None)
    np.testing.assert_array_equal(x1, x2), np.testing.assert_array_equal(b1, b2)
