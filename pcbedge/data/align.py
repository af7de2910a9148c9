"""Make a (test, template) pair comparable before the model sees it: photometric normalisation
and template registration. numpy only; part of the shared preprocessing (:func:`load_pair`).

A line camera drifts: exposure changes (brightness, contrast) and the golden template lands a
few pixels off. The model compares test and template pixel by pixel (its third input channel
is ``|test - template|``), so both faults light up every copper edge and bury the real
defects. Two cheap, classical steps undo them:

* **Contrast stretch.** Each image is mapped so its 0.5th and 99.5th intensity percentiles go
  to 0 and 255. DeepPCB boards are binarised scans (0 and 255), where this is the identity;
  a brighter or flatter capture comes back to full range. A near-flat image (spread under
  ``MIN_SPREAD`` grey levels) is left as it is rather than amplified noise.
* **Registration.** The integer translation between template and test is found by phase
  correlation (the peak of the normalised cross-power spectrum) within ``MAX_SHIFT`` pixels,
  and the template is moved onto the test, edges replicated. A peak that does not stand out
  (``MIN_PEAK`` times the spectrum's mean response) leaves the template where it was.

:class:`PairQuality` records what was done and what is left: the shift applied, the contrast
spread of each image and ``residual``, the fraction of pixels that still differ by more than a
quarter of the range. On aligned clean DeepPCB pairs the residual is the defects themselves
(about 0.5-3 %); a misregistration the search could not undo, or heavy noise, raises it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MAX_SHIFT = 16        # pixels searched in each direction
MIN_PEAK = 8.0        # correlation peak / mean |response| needed to trust a shift
MIN_SPREAD = 24       # grey levels: below this an image is left unstretched
DIFF_LEVEL = 64       # |test - template| above this counts as a residual difference
MIN_GAIN = 0.15       # a shift must cut the mean |test - template| by this fraction


@dataclass(frozen=True)
class PairQuality:
    shift_x: int = 0          # template moved by this many pixels (right, down)
    shift_y: int = 0
    peak: float = 0.0         # registration peak strength (0: not run)
    test_spread: int = 255    # grey-level spread (p99.5 - p0.5) before stretching
    template_spread: int = 255
    residual: float = 0.0     # fraction of pixels differing by > DIFF_LEVEL after alignment

    def as_dict(self) -> dict:
        return asdict(self)


def _percentiles(a: np.ndarray, qs=(0.005, 0.995)) -> tuple[int, int]:
    cdf = np.cumsum(np.bincount(a.ravel(), minlength=256)) / a.size
    return tuple(int(np.searchsorted(cdf, q)) for q in qs)


def stretch(a: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 image with its 0.5/99.5 percentiles mapped to 0/255, and the spread before."""
    lo, hi = _percentiles(a)
    spread = hi - lo
    if spread < MIN_SPREAD or (lo == 0 and hi == 255):
        return a, spread
    lut = np.clip((np.arange(256, dtype=np.float32) - lo) * (255.0 / spread) + 0.5, 0, 255)
    return lut.astype(np.uint8)[a], spread


def _half(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    q = a[:h, :w]
    s = q[0::2, 0::2].astype(np.float32)
    s += q[1::2, 0::2]
    s += q[0::2, 1::2]
    s += q[1::2, 1::2]
    return s


def estimate_shift(test: np.ndarray, template: np.ndarray, max_shift: int = MAX_SHIFT
                   ) -> tuple[int, int, float]:
    """(dx, dy, peak) by phase correlation at half resolution (to within about 2 pixels):
    moving the template by (dx, dy) aligns it with the test."""
    a, b = _half(test), _half(template)
    a -= a.mean()
    b -= b.mean()
    cross = np.fft.rfft2(a) * np.conj(np.fft.rfft2(b))
    cross /= np.maximum(np.abs(cross), 1e-6)
    r = np.fft.irfft2(cross, s=a.shape)
    m = max_shift // 2   # search the window of small shifts only (indices wrap around)
    idx = np.r_[0:m + 1, -m:0]
    win = r[np.ix_(idx % r.shape[0], idx % r.shape[1])]
    iy, ix = np.unravel_index(int(np.argmax(win)), win.shape)
    peak = float(win[iy, ix] / max(np.abs(r).mean(), 1e-12))
    return 2 * int(idx[ix]), 2 * int(idx[iy]), peak


def shift_image(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``a`` moved right by dx and down by dy (negative: left/up), edges replicated."""
    if dx == 0 and dy == 0:
        return a
    h, w = a.shape
    p = np.pad(a, ((abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx      # out[y, x] = a[y - dy, x - dx]
    return p[y0:y0 + h, x0:x0 + w]


def _mad(test: np.ndarray, template: np.ndarray, dx: int, dy: int) -> float:
    """Mean |test - template moved by (dx, dy)| over the inner part both cover, on every other
    pixel (the alignment cost)."""
    m = MAX_SHIFT + 2
    h, w = test.shape
    t = test[m:h - m:2, m:w - m:2]
    s = template[m - dy:h - m - dy:2, m - dx:w - m - dx:2]
    return float(np.mean(np.abs(t.astype(np.int16) - s)))


def register(test: np.ndarray, template: np.ndarray) -> tuple[int, int, float]:
    """(dx, dy, peak) to apply to the template. Phase correlation proposes a shift; the mean
    absolute difference decides: the best of (0, 0) and the 5x5 pixels around the proposal,
    and the template only moves when that lowers the difference by ``MIN_GAIN`` (a clean,
    aligned pair stays exactly as it was)."""
    dx, dy, peak = estimate_shift(test, template)
    if peak < MIN_PEAK:
        return 0, 0, peak
    base = _mad(test, template, 0, 0)
    best = (base, 0, 0)
    for ddy in range(-2, 3):
        for ddx in range(-2, 3):
            x, y = dx + ddx, dy + ddy
            if (x or y) and max(abs(x), abs(y)) <= MAX_SHIFT:
                best = min(best, (_mad(test, template, x, y), x, y))
    if best[0] > base * (1.0 - MIN_GAIN):
        return 0, 0, peak
    return best[1], best[2], peak


def align_pair(test: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                  PairQuality]:
    """Normalise both uint8 images and register the template onto the test."""
    test, ts = stretch(test)
    template, ms = stretch(template)
    dx, dy, peak = register(test, template)
    template = shift_image(template, dx, dy)
    residual = float(np.mean(np.abs(test.astype(np.int16) - template) > DIFF_LEVEL))
    return test, template, PairQuality(dx, dy, round(peak, 2), ts, ms, round(residual, 5))
