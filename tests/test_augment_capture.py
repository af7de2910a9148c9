"""Capture augmentation: sensor noise and defocus blur on the test image, never the template."""
from __future__ import annotations

import random

import numpy as np
import pytest

from pcbedge.families.pcbvlm.model.augment import capture_blur, capture_noise
from pcbedge.families.pcbvlm.model.train import FinetuneConfig, sample_crop
from tests.test_augment_layout import _board


def test_noise_touches_the_test_only_at_the_drawn_sigma():
    img = np.full((2, 200, 200), 128, np.uint8)
    for seed in range(6):
        twin = random.Random(seed)
        twin.getrandbits(32)                          # capture_noise seeds its field first,
        want = twin.uniform(0.0, 20.0)                # then draws sigma
        out = capture_noise(img, random.Random(seed), 20.0)
        np.testing.assert_array_equal(out[1], img[1])
        assert out.dtype == np.uint8 and out.shape == img.shape
        got = float(out[0].astype(np.float32).std())
        assert abs(got - want) <= 0.05 * want + 0.3, (got, want)
    np.testing.assert_array_equal(img, 128)               # the input is not modified


def test_blur_softens_edges_of_the_test_only():
    bd = _board()
    out = capture_blur(bd.img, random.Random(0), 2.0)
    np.testing.assert_array_equal(out[1], bd.img[1])
    edge = lambda a: np.abs(np.diff(a.astype(np.int16), axis=0)).max()   # noqa: E731
    assert edge(out[0]) < edge(bd.img[0]) == 255
    assert abs(float(out[0].mean()) - float(bd.img[0].mean())) < 2.0  # blurred, not darkened


def test_capture_augmentation_keeps_boxes_and_template():
    bd = _board()
    for seed in range(10):
        x0, b0, t0 = sample_crop(random.Random(seed), bd, 128, FinetuneConfig())
        x1, b1, t1 = sample_crop(random.Random(seed), bd, 128,
                                 FinetuneConfig(p_noise=1.0, p_blur=1.0))
        np.testing.assert_array_equal(b0, b1), np.testing.assert_array_equal(t0, t1)
        np.testing.assert_array_equal(x0[1], x1[1])         # template channel untouched
        assert not np.array_equal(x0[0], x1[0])             # the test image is degraded


def test_capture_augmentation_off_draws_nothing():
    # a run without it keeps the random stream of every earlier run
    bd = _board()
    r0, r1 = random.Random(4), random.Random(4)
    sample_crop(r0, bd, 128, FinetuneConfig())
    sample_crop(r1, bd, 128, FinetuneConfig(p_noise=0.0, p_blur=0.0, noise_sigma_max=9.0))
    assert r0.random() == r1.random()


def test_etch_moves_every_test_edge_and_keeps_visible_defects():
    from pcbedge.families.pcbvlm.model.augment import capture_etch
    bd = _board()
    col = 30  # a trace away from every defect: 3 px in both images
    widths = set()
    for seed in range(8):
        out, b, t = capture_etch(bd.img, bd.boxes, bd.types, random.Random(seed))
        np.testing.assert_array_equal(out[1], bd.img[1])        # the template is the golden one
        widths.add(int((out[0, :20, col] > 0).sum()))
        assert set(t.tolist()) <= {1, 0, 3} and {1, 0} <= set(t.tolist())
        assert len(b) == len(t)
    assert widths == {1, 5}                                     # narrower and wider, drawn both


def test_etch_drops_the_label_of_a_defect_that_vanishes():
    from types import SimpleNamespace

    from pcbedge.data.degrade import etch
    from pcbedge.families.pcbvlm.model.augment import capture_etch
    bd = _board()
    darker = SimpleNamespace(choice=lambda seq: 1)   # etch(1): dark grows, bright lines thin
    out, b, t = capture_etch(bd.img, bd.boxes, bd.types, darker)
    np.testing.assert_array_equal(out[0], etch(1)(bd.img[0], bd.img[1])[0])
    assert t.tolist() == [1, 0]                      # the 1-px spur vanished: no label
    out, b, t = capture_etch(bd.img, bd.boxes, bd.types, SimpleNamespace(choice=lambda seq: -1))
    assert t.tolist() == [1, 0, 3]


@pytest.mark.parametrize("share", ["p_etch", "p_etch_local"])
def test_etch_off_draws_nothing_and_on_keeps_the_template(share):
    bd = _board()
    r0, r1 = random.Random(4), random.Random(4)
    sample_crop(r0, bd, 128, FinetuneConfig())
    sample_crop(r1, bd, 128, FinetuneConfig(**{share: 0.0}))
    assert r0.random() == r1.random()
    x0, _, _ = sample_crop(random.Random(3), bd, 128, FinetuneConfig())
    x1, _, _ = sample_crop(random.Random(3), bd, 128, FinetuneConfig(**{share: 1.0}))
    np.testing.assert_array_equal(x0[1], x1[1])
    assert not np.array_equal(x0[0], x1[0])


def _changed_window(a: np.ndarray, b: np.ndarray):
    ys, xs = np.nonzero(a != b)
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_local_etch_changes_one_window_of_the_test_only():
    from pcbedge.data.degrade import etch
    from pcbedge.families.pcbvlm.model.augment import capture_etch_local
    bd = _board()
    amounts = set()
    for seed in range(12):
        out, b, t = capture_etch_local(bd.img, bd.boxes, bd.types, random.Random(seed))
        np.testing.assert_array_equal(out[1], bd.img[1])          # the golden image untouched
        y0, y1, x0, x1 = _changed_window(out[0], bd.img[0])
        assert y1 - y0 < 128 and x1 - x0 < 128                    # inside one window
        # what changed is a global etch of the board, cut to that window
        for px in (-2, -1, 1, 2):
            e = etch(px)(bd.img[0], bd.img[1])[0]
            if np.array_equal(out[0][y0:y1 + 1, x0:x1 + 1], e[y0:y1 + 1, x0:x1 + 1]):
                amounts.add(px)
                break
        else:
            raise AssertionError(f"seed {seed}: the window is not an etch of 1-2 px")
        outside = np.ones(out[0].shape, bool)
        outside[y0:y1 + 1, x0:x1 + 1] = False
        np.testing.assert_array_equal(out[0][outside], bd.img[0][outside])
        assert len(b) == len(t) and set(t.tolist()) <= {0, 1, 3} and {0, 1} <= set(t.tolist())
    assert {a // abs(a) for a in amounts} == {-1, 1}               # wider and narrower drawn


def test_local_etch_drops_a_label_only_where_the_defect_vanishes():
    from pcbedge.families.pcbvlm.model.augment import capture_etch_local
    bd = _board()
    dropped = kept = 0
    for seed in range(400):
        out, b, t = capture_etch_local(bd.img, bd.boxes, bd.types, random.Random(seed))
        y0, y1, x0, x1 = _changed_window(out[0], bd.img[0])
        spur_in = y0 <= 150 and y1 >= 159 and x0 <= 60 <= x1
        if 3 not in t.tolist():
            dropped += 1
            assert spur_in                  # only an etch that reaches the 1-px spur removes it
        elif spur_in:
            kept += 1                       # a wider etch keeps it
    assert dropped and kept


def test_local_etch_leaves_a_crop_without_copper_edges_as_it_is():
    from pcbedge.families.pcbvlm.model.augment import capture_etch_local
    blank = np.zeros((2, 64, 64), np.uint8)                # no copper edge: nothing to etch
    out, b, t = capture_etch_local(blank, np.zeros((0, 4), np.float32),
                                   np.zeros(0, np.int64), random.Random(0))
    np.testing.assert_array_equal(out, blank)
