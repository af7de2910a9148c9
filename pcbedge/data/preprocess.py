"""The one function that turns a (test, template) pair into the model input.

Training, export checks, calibration and every runtime call :func:`load_pair`, so the resize,
normalisation, channel order and EXIF handling are the same everywhere. numpy + Pillow only.

Input tensor: float32 [3, S, S], channels (test, template, |test - template|), values in [0, 1],
grayscale, EXIF orientation applied, each image contrast-stretched and the template registered
onto the test (:mod:`pcbedge.data.align`), bilinear resize from the original size to S x S.
Boxes predicted in model pixels map back to the original image with :meth:`PairMeta.to_original`.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pcbedge.data.align import PairQuality, align_pair
from pcbedge.errors import InputImageError

MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding
MIN_SIDE = 32
RECIPE = {
    "channels": ["test", "template", "abs_diff"],
    "color": "grayscale (PIL 'L'; 16-bit scaled to 8-bit)",
    "exif_transpose": True,
    "align": "contrast stretch (p0.5/p99.5 -> 0/255) + template registration (phase "
             "correlation, |shift| <= 16 px), pcbedge.data.align.align_pair",
    "resize": "bilinear to input_size x input_size",
    "scale": "x / 255.0",
    "layout": "NCHW float32",
}


@dataclass(frozen=True)
class PairMeta:
    orig_w: int
    orig_h: int
    input_size: int
    quality: PairQuality | None = None   # what alignment did and left (None: not aligned)

    @property
    def sx(self) -> float:
        return self.orig_w / self.input_size

    @property
    def sy(self) -> float:
        return self.orig_h / self.input_size

    def to_original(self, box) -> list[float]:
        x1, y1, x2, y2 = box
        return [x1 * self.sx, y1 * self.sy, x2 * self.sx, y2 * self.sy]

    def to_input(self, box) -> list[float]:
        x1, y1, x2, y2 = box
        return [x1 / self.sx, y1 / self.sy, x2 / self.sx, y2 / self.sy]

    def as_dict(self) -> dict:
        return asdict(self)   # quality becomes a plain dict too

    def quality_dict(self) -> dict | None:
        """The alignment's PairQuality as a dict (what the answer's confidence reads)."""
        return self.quality.as_dict() if self.quality is not None else None


def read_gray(path: str | Path | bytes) -> np.ndarray:
    """Decode an image file to a uint8 grayscale array, EXIF orientation applied."""
    name = "<bytes>" if isinstance(path, (bytes, bytearray)) else str(path)
    if not isinstance(path, (bytes, bytearray)):
        p = Path(path)
        if not p.is_file():
            raise InputImageError(f"image {name} not found", fix="check the path")
        if p.stat().st_size == 0:
            raise InputImageError(f"image {name} is empty (0 bytes)", fix="re-capture or re-copy it")
    try:
        src = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path
        with Image.open(src) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputImageError(
                    f"image {name} is {im.width}x{im.height}, over {MAX_PIXELS:,} pixels",
                    fix="crop the board region before asking")
            im.load()
            im = ImageOps.exif_transpose(im)
            arr = _to_gray_u8(im)
    except InputImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise InputImageError(f"image {name} cannot be decoded ({type(e).__name__}: {e})",
                              fix="the file is corrupt, truncated or not an image") from None
    if min(arr.shape) < MIN_SIDE:
        raise InputImageError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, "
                              f"smaller than {MIN_SIDE} px", fix="pass the full board image")
    return arr


def _to_gray_u8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit modes are always full-scale 65535; 32-bit "I" has no fixed scale, so guess
        hi = 65535.0 if im.mode != "I" or a.max() > 255 else 255.0
        return np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def resize_u8(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def pair_to_input(test: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Two uint8 [H, W] arrays of one size -> float32 [3, H, W] (test, template, |diff|)."""
    t = test.astype(np.float32) * (1.0 / 255.0)
    m = template.astype(np.float32) * (1.0 / 255.0)
    return np.stack([t, m, np.abs(t - m)])


def prepare_pair(test: np.ndarray, temp: np.ndarray, input_size: int,
                 names: tuple[str, str] = ("board image", "template")
                 ) -> tuple[np.ndarray, PairMeta]:
    """Two decoded uint8 images -> the model input [3, S, S] and its meta (align, resize)."""
    if test.shape != temp.shape:
        raise InputImageError(
            f"template {names[1]} is {temp.shape[1]}x{temp.shape[0]} but the board image "
            f"{names[0]} is {test.shape[1]}x{test.shape[0]}",
            fix="pass the golden template of the same area, aligned and of the same size")
    test, temp, quality = align_pair(test, temp)
    meta = PairMeta(orig_w=test.shape[1], orig_h=test.shape[0], input_size=input_size,
                    quality=quality)
    return pair_to_input(resize_u8(test, input_size), resize_u8(temp, input_size)), meta


def load_pair(test_path, template_path, input_size: int = 640) -> tuple[np.ndarray, PairMeta]:
    """Load a (test, template) pair into the model input [3, S, S] and its coordinate meta."""
    return prepare_pair(read_gray(test_path), read_gray(template_path), input_size,
                        (str(test_path), str(template_path)))
