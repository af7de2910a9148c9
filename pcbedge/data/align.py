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

Small images: registration searches at most a quarter of the shorter side (``MAX_SHIFT`` on a
board of 64 px or more) and is skipped below ``MIN_REGISTER_SIDE``; nothing here ever averages
an empty slice (no NaN, no numpy RuntimeWarning, whatever the size).

:func:`find_damage` looks for what a JPEG decoder cannot see (JPEG has no checksum: a flipped bit
that still decodes to valid Huffman codes is a valid JPEG of another image). Such damage follows
the codec's 8x8 blocks in their coding order, which no board and no capture does:

* **offset**: from one block on, every block differs from the template by the same grey level
  (a damaged DC difference: the DC of each block is coded relative to the previous one);
* **displaced**: from one block on, the blocks match the template's blocks one or two places
  further in coding order (a damaged Huffman code resynchronised with blocks lost or gained);
* **pattern**: one block holds a strong high-frequency cosine pattern its neighbours do not share
  (a damaged coefficient).

Each is a long run in coding order (or one isolated 8x8 block), tested against the rest of the
image with a likelihood ratio; the thresholds leave all 1,000 clean DeepPCB trainval pairs (and
the bundled sample) unflagged. A finding is a warning in the answer, not an error: a heuristic
must not refuse a real board.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

MAX_SHIFT = 16        # pixels searched in each direction
MIN_PEAK = 8.0        # correlation peak / mean |response| needed to trust a shift
MIN_SPREAD = 24       # grey levels: below this an image is left unstretched
DIFF_LEVEL = 64       # |test - template| above this counts as a residual difference
MIN_GAIN = 0.15       # a shift must cut the mean |test - template| by this fraction
MIN_REGISTER_SIDE = 24  # pixels: below this the template is not registered at all


@dataclass(frozen=True)
class PairQuality:
    shift_x: int = 0          # template moved by this many pixels (right, down)
    shift_y: int = 0
    peak: float = 0.0         # registration peak strength (0: not run)
    test_spread: int = 255    # grey-level spread (p99.5 - p0.5) before stretching
    template_spread: int = 255
    residual: float = 0.0     # fraction of pixels differing by > DIFF_LEVEL after alignment
    damage: tuple[str, ...] = ()   # signs of damaged image data (find_damage); warned about

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


def _mad(test: np.ndarray, template: np.ndarray, dx: int, dy: int,
         max_shift: int = MAX_SHIFT) -> float:
    """Mean |test - template moved by (dx, dy)| over the inner part both cover, on every other
    pixel (the alignment cost). The margin leaves at least 8 pixels each way."""
    h, w = test.shape
    m = max_shift + 2
    t = test[m:h - m:2, m:w - m:2]
    s = template[m - dy:h - m - dy:2, m - dx:w - m - dx:2]
    return float(np.mean(np.abs(t.astype(np.int16) - s)))


def search_range(shape: tuple[int, int]) -> int:
    """The largest shift searched on an image of this shape: ``MAX_SHIFT``, at most a quarter
    of the shorter side less the cost's margin (0: too small to register)."""
    r = min(MAX_SHIFT, (min(shape) - 2 * 2 - 16) // 2, min(shape) // 4)
    return r if min(shape) >= MIN_REGISTER_SIDE and r >= 2 else 0


def register(test: np.ndarray, template: np.ndarray) -> tuple[int, int, float]:
    """(dx, dy, peak) to apply to the template. Phase correlation proposes a shift; the mean
    absolute difference decides: the best of (0, 0) and the 5x5 pixels around the proposal,
    and the template only moves when that lowers the difference by ``MIN_GAIN`` (a clean,
    aligned pair stays exactly as it was). Images too small to search (:func:`search_range`)
    are not registered: (0, 0, 0.0)."""
    max_shift = search_range(test.shape)
    if not max_shift:
        return 0, 0, 0.0
    dx, dy, peak = estimate_shift(test, template, max_shift)
    if peak < MIN_PEAK:
        return 0, 0, peak
    base = _mad(test, template, 0, 0, max_shift)
    best = (base, 0, 0)
    for ddy in range(-2, 3):
        for ddx in range(-2, 3):
            x, y = dx + ddx, dy + ddy
            if (x or y) and max(abs(x), abs(y)) <= max_shift:
                best = min(best, (_mad(test, template, x, y, max_shift), x, y))
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


# --- damaged image data ---------------------------------------------------------------------------

BLOCK = 8                   # the JPEG block; coding order is raster order of blocks
DAMAGE_MIN_SIDE = 64        # pixels: smaller pairs have too few blocks to test
OFFSET_MIN, OFFSET_MAX = 4, 192   # grey levels of a constant offset worth testing
_DCT = np.cos(np.pi * (2 * np.arange(8)[None, :] + 1) * np.arange(8)[:, None] / 16) * 0.5
_DCT[0] /= np.sqrt(2.0)
_DCT = _DCT.astype(np.float32)          # orthonormal 8-point DCT-II

_HIGH = np.add.outer(np.arange(8), np.arange(8)) >= 3     # frequencies a damaged block shows
PATTERN_AMPLITUDE = 400.0   # one DCT coefficient of the difference (full-scale is 2040)
PATTERN_SHARE = 0.42        # of the block difference's energy in that one coefficient
PATTERN_ISOLATION = 0.35    # the neighbours' same coefficient stays under this fraction


def dct2(blocks: np.ndarray) -> np.ndarray:
    """2-D DCT-II of 8x8 blocks [..., 8, 8] (any integer or float dtype) -> float32.

    The products run with floating-point warnings off: some BLAS builds (aarch64 numpy wheels
    under Debian's arm64 userland, macOS Accelerate: numpy issues 28687 and 29820) leave stale
    divide/overflow/invalid flags after a correct matmul, which numpy reports as RuntimeWarnings
    on every board. The inputs here are bounded integer differences, so the result is finite."""
    with np.errstate(all="ignore"):
        return _DCT @ blocks.astype(np.float32) @ _DCT.T


def _blocks(a: np.ndarray, bh: int, bw: int, step: int = 1) -> np.ndarray:
    """[bh * bw, (8 / step) ** 2] int16: the image's 8x8 blocks in coding (raster) order, every
    ``step``-th pixel of each."""
    k = BLOCK // step
    x = a[:bh * BLOCK:step, :bw * BLOCK:step].astype(np.int16)
    return x.reshape(bh, k, bw, k).transpose(0, 2, 1, 3).reshape(bh * bw, k * k)


def _loglik(c: np.ndarray, n: np.ndarray) -> np.ndarray:
    n = np.maximum(n, 1)
    p = np.clip(c / n, 1e-12, 1 - 1e-12)
    return c * np.log(p) + (n - c) * np.log1p(-p)


@lru_cache(maxsize=8)
def _row_pairs(bh: int) -> tuple[np.ndarray, np.ndarray]:
    """Every run of block rows [r1, r2), 0 <= r1 < r2 <= bh."""
    return np.triu_indices(bh + 1, 1)


def _run_of_rows(hit: np.ndarray, base: np.ndarray, bh: int, bw: int, min_count: int):
    """The run of block rows [r1, r2) where ``hit`` is densest against the rest of the image
    (Bernoulli likelihood ratio, hits counted among ``base`` blocks). Returns (llr, r1, r2,
    fraction inside, fraction outside) or None when no run holds ``min_count`` hits at four
    times the density outside."""
    if int(hit.sum()) < min_count:
        return None
    rows = np.r_[0, np.cumsum(hit.reshape(bh, bw).sum(1))]
    brows = np.r_[0, np.cumsum(base.reshape(bh, bw).sum(1))]
    r1, r2 = _row_pairs(bh)
    total, nbase = rows[-1], brows[-1]
    cin, nin = rows[r2] - rows[r1], brows[r2] - brows[r1]
    cout, nout = total - cin, nbase - nin
    pin, pout = cin / np.maximum(nin, 1), cout / np.maximum(nout, 1)
    ok = (cin >= min_count) & (pin >= 4 * pout)
    if not ok.any():
        return None
    llr = np.where(ok, _loglik(cin, nin) + _loglik(cout, nout) - _loglik(total, nbase), -1.0)
    j = int(np.argmax(llr))
    return float(llr[j]), int(r1[j]), int(r2[j]), float(pin[j]), float(pout[j])


def _first(hit: np.ndarray, r1: int, bw: int) -> tuple[int, int]:
    """Pixel (x, y) of the first hit block at or after block row ``r1``."""
    k = int(np.argmax(hit[r1 * bw:])) + r1 * bw
    return (k % bw) * BLOCK, (k // bw) * BLOCK


def _offset_run(t2: np.ndarray, m2: np.ndarray, bh: int, bw: int) -> str | None:
    """A run of blocks (in coding order) that all differ from the template by one grey level."""
    d = t2 - m2
    n = d.shape[1]
    part = np.partition(d, (n // 2 - 1, n // 2), axis=1)
    med = (part[:, n // 2 - 1].astype(np.int32) + part[:, n // 2]) // 2
    mag = np.abs(med)
    cand = med[(mag >= OFFSET_MIN) & (mag <= OFFSET_MAX)]
    min_count = max(16, bw // 2)
    if cand.size < min_count:
        return None
    hist = np.convolve(np.bincount(cand + 256, minlength=513), np.ones(3, int), mode="same")
    everywhere = np.ones(bh * bw, bool)
    for c in np.argsort(-hist)[:4]:
        v = int(c) - 256
        if hist[c] < min_count or not OFFSET_MIN <= abs(v) <= OFFSET_MAX:
            continue
        hit = np.abs(med - v) <= max(1, abs(v) // 16)
        run = _run_of_rows(hit, everywhere, bh, bw, min_count)
        if run is None:
            continue
        llr, r1, r2, pin, _ = run
        whole = r1 == 0 and r2 == bh
        if (whole and pin >= 0.5) or (not whole and ((pin >= 0.1 and llr >= 40) or (
                pin >= 0.06 and llr >= 150 and abs(v) >= 8))):
            x, y = _first(hit, r1, bw)
            return (f"from pixel ({x}, {y}) on, in the JPEG's block order, one of the two images "
                    f"is {abs(v)} grey levels {'brighter' if v > 0 else 'darker'} than the other "
                    "block after block (damaged JPEG data: a flipped bit in a DC difference?)")
    return None


def _displaced_run(t2: np.ndarray, m2: np.ndarray, bh: int, bw: int) -> str | None:
    """A run of blocks that match the template's blocks one or two places away in coding order."""
    sad0 = np.abs(t2 - m2).sum(1)
    base = sad0 >= 16 * t2.shape[1]          # blocks that differ by 16 grey levels on average
    if base.sum() < 16:
        return None
    for n in (1, -1, 2, -2):
        mn = np.roll(m2, -n, axis=0)          # the template's block b + n
        hit = base & (np.abs(t2 - mn).sum(1) <= 0.25 * sad0)
        run = _run_of_rows(hit, base, bh, bw, 16)
        if run is None:
            continue
        llr, r1, r2, pin, _ = run
        cols = hit.reshape(bh, bw)[r1:r2].any(0).sum()
        if cols >= max(4, bw // 10) and ((pin >= 0.7 and llr >= 30) or (pin >= 0.5 and llr >= 60)):
            x, y = _first(hit, r1, bw)
            return (f"from pixel ({x}, {y}) on, the 8x8 blocks of one image match the other's "
                    f"{abs(n)} block{'s' if abs(n) > 1 else ''} {'later' if n > 0 else 'earlier'} "
                    "in the JPEG's block order (damaged JPEG data: blocks lost or gained?)")
    return None


def _pattern_block(test: np.ndarray, template: np.ndarray, bh: int, bw: int,
                   t2: np.ndarray, m2: np.ndarray) -> str | None:
    """One block whose difference is a single strong high-frequency cosine its neighbours lack
    (candidates: blocks whose every-other-pixel difference reaches 96 grey levels)."""
    big = np.abs(t2 - m2).max(1) >= 96
    if not big.any():
        return None
    cand = np.stack(np.divmod(np.flatnonzero(big), bw), 1)
    e = test[:bh * BLOCK, :bw * BLOCK].astype(np.int16) - template[:bh * BLOCK, :bw * BLOCK]
    eb = e.reshape(bh, BLOCK, bw, BLOCK).transpose(0, 2, 1, 3)
    c = dct2(eb[cand[:, 0], cand[:, 1]])
    energy = (c * c).reshape(len(c), 64)
    high = np.where(_HIGH.ravel(), energy, 0.0)
    j = high.argmax(1)
    top = high[np.arange(len(c)), j]
    strong = (np.sqrt(top) >= PATTERN_AMPLITUDE) & (top >= PATTERN_SHARE * energy.sum(1))
    for i in np.flatnonzero(strong)[np.argsort(-top[strong])]:
        by, bx = cand[i]
        u, v = divmod(int(j[i]), 8)
        neighbours = [abs(float(dct2(eb[y, x])[u, v]))
                      for y, x in ((by - 1, bx), (by + 1, bx), (by, bx - 1), (by, bx + 1))
                      if 0 <= y < bh and 0 <= x < bw]
        if max(neighbours, default=0.0) <= PATTERN_ISOLATION * float(np.sqrt(top[i])):
            return (f"the 8x8 block at pixel ({bx * BLOCK}, {by * BLOCK}) holds a stripe pattern "
                    "that neither its neighbours nor the other image has (damaged JPEG data: a "
                    "flipped bit in a coefficient?)")
    return None


def find_damage(test: np.ndarray, template: np.ndarray,
                shift: tuple[int, int] = (0, 0)) -> tuple[str, ...]:
    """Signs of damaged JPEG data in an aligned pair (module docstring): one sentence per
    finding, empty for a clean pair. About 5 ms on a 640x640 pair. Pairs under
    ``DAMAGE_MIN_SIDE`` pixels are not tested.

    ``shift`` is the registration's (PairQuality.shift_x, shift_y). A shift of whole blocks is
    what registration does when displaced blocks fill most of the image (it follows the
    majority): the displaced run is then looked for in the pair as it was before the shift too.
    """
    h, w = test.shape
    if min(h, w) < DAMAGE_MIN_SIDE or test.shape != template.shape:
        return ()
    bh, bw = h // BLOCK, w // BLOCK
    t2, m2 = _blocks(test, bh, bw, 2), _blocks(template, bh, bw, 2)
    displaced = _displaced_run(t2, m2, bh, bw)
    dx, dy = shift
    if displaced is None and (dx or dy) and dx % BLOCK == 0 and dy % BLOCK == 0:
        unshifted = _blocks(shift_image(template, -dx, -dy), bh, bw, 2)
        displaced = _displaced_run(t2, unshifted, bh, bw)
    found = [_offset_run(t2, m2, bh, bw), displaced,
             _pattern_block(test, template, bh, bw, t2, m2)]
    return tuple(f for f in found if f)
