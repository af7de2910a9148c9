"""Image degradations of a (test, template) pair, for robustness benchmarks and for fitting
how confidence should fall on poor captures. numpy + Pillow; deterministic.

Each degradation maps the decoded uint8 (test, template) arrays before the shared
preprocessing (:func:`pcbedge.data.preprocess.prepare_pair`) runs, so alignment and
normalisation see exactly what a camera would have delivered.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

Degrade = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _pil(a: np.ndarray):
    from PIL import Image
    return Image.fromarray(a)


def blur(radius: float) -> Degrade:
    def apply(test, temp):
        from PIL import ImageFilter
        return np.asarray(_pil(test).filter(ImageFilter.GaussianBlur(radius=radius))), temp
    return apply


def noise(sigma: float, seed: int = 0) -> Degrade:
    def apply(test, temp):
        rng = np.random.default_rng(seed)  # the same noise field on every board: reproducible
        noisy = test.astype(np.float32) + rng.normal(0.0, sigma, test.shape).astype(np.float32)
        return np.clip(noisy + 0.5, 0, 255).astype(np.uint8), temp
    return apply


def jpeg(quality: int) -> Degrade:
    def apply(test, temp):
        from PIL import Image
        buf = io.BytesIO()
        _pil(test).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("L")), temp
    return apply


def affine(scale: float, offset: float) -> Degrade:
    """Test image intensities scaled about mid-grey and offset (exposure / gain drift)."""
    def apply(test, temp):
        y = (test.astype(np.float32) - 128.0) * scale + 128.0 + offset
        return np.clip(y + 0.5, 0, 255).astype(np.uint8), temp
    return apply


def shift(px: int) -> Degrade:
    """Template moved ``px`` right and down (edge replicated): a misregistered golden image."""
    def apply(test, temp):
        padded = np.pad(temp, ((px, 0), (px, 0)), mode="edge")
        return test, padded[: temp.shape[0], : temp.shape[1]]
    return apply


def morph3(a: np.ndarray, op) -> np.ndarray:
    """3x3 max (op=np.maximum) or min (np.minimum) filter over the last two axes, edges kept."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = a.shape[-2:]
    out = a.copy()
    for dy in range(3):
        for dx in range(3):
            out = op(out, p[..., dy:dy + h, dx:dx + w])
    return out


def etch(px: int) -> Degrade:
    """The test board's copper (dark in DeepPCB's images) ``px`` pixels wider on every edge
    (px > 0, under-etched) or narrower (px < 0, over-etched) than the golden image's: every
    copper edge of the pair then differs by a 1-px sliver, and no defect was added."""
    def apply(test, temp):
        op = np.minimum if px > 0 else np.maximum
        out = test
        for _ in range(abs(px)):
            out = morph3(out, op)
        return out, temp
    return apply


# What `pcbedge bench --robustness` reports. The first nine are everyday capture and process
# faults the shared preprocessing and training are built to absorb; the "severe" ones are
# beyond it (a template shift past the registration search, heavy noise and blur), where
# accuracy does fall and the confidence must fall with it.
DEGRADATIONS: dict[str, Degrade] = {
    "gaussian_blur_r1.5": blur(1.5),
    "gaussian_noise_s12": noise(12.0),
    "jpeg_q30": jpeg(30),
    "brightness_+40": affine(1.0, 40.0),
    "contrast_x0.6": affine(0.6, 0.0),
    "template_shift_2px": shift(2),
    "template_shift_4px": shift(4),
    "etch_wider_1px": etch(1),
    "etch_narrower_1px": etch(-1),
    "severe_blur_r3": blur(3.0),
    "severe_noise_s40": noise(40.0),
    "severe_template_shift_24px": shift(24),
}

# What the quality-aware confidence is fitted on (validation boards): other severities and
# noise fields than the benchmark's, so the bench does not grade the fit on its own data.
CALIBRATION_DEGRADATIONS: dict[str, Degrade] = {
    "blur_r2": blur(2.0),
    "blur_r4": blur(4.0),
    "noise_s25": noise(25.0, seed=1),
    "noise_s60": noise(60.0, seed=2),
    "shift_20px": shift(20),
    "shift_40px": shift(40),
    "jpeg_q10": jpeg(10),
}
