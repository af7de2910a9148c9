"""Photometric normalisation and template registration of the shared preprocessing."""
from __future__ import annotations

import numpy as np
import pytest

from pcbedge.data.align import (MAX_SHIFT, PairQuality, align_pair, estimate_shift, register,
                                shift_image, stretch)
from pcbedge.data.preprocess import load_pair, prepare_pair, read_gray


def _board(seed: int = 0, size: int = 256) -> np.ndarray:
    """A binary board-like image: random copper rectangles on black."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size), np.uint8)
    for _ in range(40):
        x, y = rng.integers(0, size - 40, 2)
        w, h = rng.integers(4, 40, 2)
        a[y:y + h, x:x + w] = 255
    return a


def test_shift_image_moves_right_and_down_with_edges_replicated():
    a = np.arange(25, dtype=np.uint8).reshape(5, 5)
    s = shift_image(a, 1, 2)
    assert s[2, 1] == a[0, 0] and s[4, 4] == a[2, 3]
    assert (s[0] == s[1]).all() and (s[:, 0] == s[:, 1]).all()
    assert np.array_equal(shift_image(s, 0, 0), s)


def test_stretch_is_identity_on_binary_scans_and_undoes_exposure():
    a = _board()
    assert stretch(a)[0] is a
    for scale, offset in ((1.0, 40.0), (0.6, 0.0), (0.5, -30.0)):
        y = np.clip((a.astype(np.float32) - 128) * scale + 128 + offset, 0, 255).astype(np.uint8)
        back, spread = stretch(y)
        assert spread < 255
        assert np.abs(back.astype(int) - a).max() <= 2, (scale, offset)


def test_flat_image_is_not_amplified():
    flat = np.full((64, 64), 120, np.uint8)
    flat[::7, ::5] = 130
    out, spread = stretch(flat)
    assert spread < 24 and out is flat


@pytest.mark.parametrize("dx,dy", [(0, 0), (2, 2), (-4, 3), (7, -5), (-MAX_SHIFT, MAX_SHIFT)])
def test_register_undoes_a_template_shift(dx, dy):
    test = _board(1)
    template = shift_image(test, dx, dy)
    rx, ry, peak = register(test, template)
    assert (rx, ry) == (-dx, -dy)
    assert peak > 8
    _, aligned, q = align_pair(test, template)
    assert (q.shift_x, q.shift_y) == (-dx, -dy)
    m = MAX_SHIFT + 1  # away from the replicated border
    assert np.array_equal(aligned[m:-m, m:-m], test[m:-m, m:-m])


def test_aligned_pair_with_a_defect_stays_put():
    test = _board(2)
    test[100:106, 50:54] = 0            # a pin-hole: a real difference, not a misalignment
    template = _board(2)
    rx, ry, _ = register(test, template)
    assert (rx, ry) == (0, 0)
    _, _, q = align_pair(test, template)
    assert q.residual == pytest.approx(24 / 256 ** 2, abs=1e-4)


def test_estimate_shift_reports_peak_strength():
    test = _board(3)
    dx, dy, peak = estimate_shift(test, shift_image(test, 4, 0))
    assert abs(dx + 4) <= 2 and abs(dy) <= 2
    noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    assert estimate_shift(test, noise)[2] < peak


def test_prepare_pair_records_quality_in_meta():
    test = _board(4)
    x, meta = prepare_pair(test, shift_image(test, 3, -2), 128)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32
    assert isinstance(meta.quality, PairQuality)
    assert (meta.quality.shift_x, meta.quality.shift_y) == (-3, 2)
    assert meta.as_dict()["quality"]["shift_x"] == -3


def test_load_pair_on_the_sample_keeps_most_clean_pairs_unmoved(sample_data):
    from pcbedge.data.deeppcb import read_list
    boards = read_list(sample_data, "bench.txt")[:12]
    moved = 0
    for b in boards:
        x, meta = load_pair(b.test_path, b.template_path, 640)
        q = meta.quality
        moved += (q.shift_x, q.shift_y) != (0, 0)
        assert max(abs(q.shift_x), abs(q.shift_y)) <= 2, (b.id, q)   # DeepPCB pairs are aligned
        assert q.residual < 0.05, (b.id, q)
        if (q.shift_x, q.shift_y) == (0, 0):
            assert np.allclose(x[0], read_gray(b.test_path) / 255.0, atol=1e-6)
    assert moved <= len(boards) // 4


def test_dct2_is_the_orthonormal_2d_dct_of_each_block():
    """The block DCT of the damage check, against the definition, batched and not."""
    from pcbedge.data.align import dct2
    rng = np.random.default_rng(3)
    blocks = rng.integers(-255, 256, size=(5, 8, 8)).astype(np.int16)
    n = np.arange(8)
    a = np.where(n[:, None] == 0, np.sqrt(1 / 8), np.sqrt(2 / 8))
    basis = a * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16)     # [k, n]
    want = np.einsum("un,bnm,vm->buv", basis, blocks.astype(np.float64), basis)
    got = dct2(blocks)
    assert got.dtype == np.float32 and got.shape == (5, 8, 8)
    np.testing.assert_allclose(got, want, atol=2e-3)
    np.testing.assert_allclose(dct2(blocks[2]), want[2], atol=2e-3)
    # orthonormal: energy is kept (Parseval)
    np.testing.assert_allclose((got.astype(np.float64) ** 2).sum((1, 2)),
                               (blocks.astype(np.float64) ** 2).sum((1, 2)), rtol=1e-5)
