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
import re
import struct
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pcbedge.data import image_io, png_check
from pcbedge.data.align import PairQuality, align_pair, find_damage
from pcbedge.data.image_io import MAX_PIXELS  # refuse decompression bombs before decoding
from pcbedge.errors import InputImageError

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
    """Decode an image file (or its bytes) strictly to a uint8 grayscale array, EXIF
    orientation applied. Anything but a clean image is an :class:`InputImageError` naming the
    file (:mod:`pcbedge.data.image_io`: non-regular files, damaged or truncated data,
    decompression bombs)."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        name, data = "<bytes>", bytes(path)
    else:
        name, data = str(path), read_image_bytes(path)
    arr = decode_image(data, name, _to_gray_u8)
    if min(arr.shape) < MIN_SIDE:
        raise InputImageError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, "
                              f"smaller than {MIN_SIDE} px", fix="pass the full board image")
    return arr


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file; a missing path, a directory, FIFO, device or socket, an
    unreadable or empty file is an :class:`InputImageError` with its own message. A FIFO is
    never opened (:func:`pcbedge.data.image_io.read_file_bytes`)."""
    name = str(path)
    try:
        data = image_io.read_file_bytes(path)
    except FileNotFoundError:
        raise InputImageError(f"image {name} not found", fix="check the path") from None
    except image_io.NotAFile as e:
        raise InputImageError(f"image {name} is {e.kind}, not an image file",
                              fix="pass the path of the board's image file (JPEG or PNG)"
                              ) from None
    except PermissionError:
        raise InputImageError(f"image {name} cannot be read (permission denied)",
                              fix="check the file's permissions") from None
    except image_io.ImageTooLarge:
        raise InputImageError(f"image {name} is over {image_io.MAX_FILE_BYTES:,} bytes",
                              fix="crop the board region before asking") from None
    except (OSError, ValueError) as e:   # ENAMETOOLONG, ELOOP, EIO, a NUL in the path, ...
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputImageError(f"image {name} cannot be read ({why})",
                              fix="check the path and the storage it is on") from None
    if not data:
        raise InputImageError(f"image {name} is empty (0 bytes)", fix="re-capture or re-copy it")
    return data


def _too_large(name: str, size: tuple[int, int] | None, pixels: int | None = None
               ) -> InputImageError:
    dims = f"{size[0]}x{size[1]}, " if size else (f"{pixels:,} pixels, " if pixels else "")
    return InputImageError(
        f"image {name} is {dims}over {MAX_PIXELS:,} pixels: refused from its header, before "
        "decoding (a decompression bomb, or a photo far larger than a board)",
        fix="crop the board region before asking")


# what Pillow raises on malformed files (its parsers are not all defensive)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError,
                  KeyError, TypeError, ZeroDivisionError, struct.error, Warning)


def decode_image(data: bytes, name: str = "<bytes>", convert=None):
    """The image in ``data`` decoded strictly: a loaded PIL image with its EXIF orientation
    applied, or ``convert(image)``. The format's structure is checked first (JPEG markers and
    data size, PNG chunks, CRCs and data size; :mod:`pcbedge.data.image_io`), a JPEG's entropy
    data is decoded once in strict mode (any libjpeg warning is an error), and a warning Pillow
    raises while decoding (corrupt EXIF, ...) is an error too. Every failure is an
    :class:`InputImageError` naming ``name``; a header over :data:`MAX_PIXELS` has its own
    message (a decompression bomb)."""
    if not data:
        raise InputImageError(f"image {name} is empty (0 bytes)", fix="re-capture or re-copy it")
    kind = image_io.sniff(data)
    try:
        if kind == "jpeg":
            info = image_io.check_jpeg(data)
            _, pixels = image_io.strict_decode_jpeg(data, info)
            if pixels is not None and convert is _to_gray_u8 and not info.exif:
                return pixels          # a grey JPEG, no EXIF: the strict decode's pixels
        elif kind == "png":
            png_check.check_png(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise image_io.ImageTooLarge(im.size)
                im.load()
                im = ImageOps.exif_transpose(im)
                return convert(im) if convert is not None else im
    except image_io.ImageTooLarge as e:
        raise _too_large(name, e.size) from None
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(name, None, int(m.group(1)) if m else None) from None
    except image_io.ImageDamaged as e:
        raise InputImageError(f"image {name} cannot be decoded: {e}",
                              fix="the file is damaged or truncated: re-capture or re-copy it"
                              ) from None
    except MemoryError:
        raise InputImageError(f"image {name} cannot be decoded (out of memory)",
                              fix="crop the board region before asking") from None
    except _DECODE_ERRORS as e:
        raise InputImageError(f"image {name} cannot be decoded ({type(e).__name__}: {e})",
                              fix="the file is corrupt, truncated or not an image") from None


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


MAX_UPSCALE = 5.0   # the model reads a board enlarged at most this much (see min_board_side)


def min_board_side(input_size: int) -> int:
    """The shortest board side (pixels) a model of this input size reads: resizing enlarges
    the short side ``input_size / side`` times, and past ``MAX_UPSCALE`` the model no longer
    reads the board. Measured with the reference model (input 640) on 60 DeepPCB validation
    boards shrunk to s x s and enlarged back (describe-all recall / precision): 640: 1.00 /
    0.995, 160: 0.99 / 0.99, 128 (5x): 0.97 / 0.99, 96: 0.89 / 0.98, 64: 0.67 / 0.94, 48: 0.48 /
    0.85. One axis alone squeezed 2-6x (an elongated board) keeps recall >= 0.98, so the long
    side is bounded only by :data:`MAX_PIXELS`."""
    return max(MIN_SIDE, -(-int(input_size) // int(MAX_UPSCALE)))


def check_pair_size(shape: tuple[int, int], input_size: int, names: tuple[str, str]) -> None:
    """Refuse a pair whose short side the model cannot read (:func:`min_board_side`)."""
    h, w = shape
    least = min_board_side(input_size)
    if min(h, w) < least:
        raise InputImageError(
            f"board image {names[0]} is {w}x{h}: its short side is under {least} px, the least "
            f"this model (input {input_size}x{input_size}) reads (it would be enlarged more "
            f"than {MAX_UPSCALE:g}x)",
            fix=f"capture the board at a higher resolution (both sides at least {least} px); "
                "do not crop it smaller than the whole board")


def prepare_pair(test: np.ndarray, temp: np.ndarray, input_size: int,
                 names: tuple[str, str] = ("board image", "template")
                 ) -> tuple[np.ndarray, PairMeta]:
    """Two decoded uint8 images -> the model input [3, S, S] and its meta (align, resize).
    The meta's quality records the alignment and any sign of damaged image data
    (:func:`pcbedge.data.align.find_damage`), which the answer warns about."""
    if test.shape != temp.shape:
        raise InputImageError(
            f"template {names[1]} is {temp.shape[1]}x{temp.shape[0]} but the board image "
            f"{names[0]} is {test.shape[1]}x{test.shape[0]}",
            fix="pass the golden template of the same area, aligned and of the same size")
    check_pair_size(test.shape, input_size, names)
    test, temp, quality = align_pair(test, temp)
    damage = find_damage(test, temp, (quality.shift_x, quality.shift_y))
    if damage:
        quality = replace(quality, damage=damage)
    meta = PairMeta(orig_w=test.shape[1], orig_h=test.shape[0], input_size=input_size,
                    quality=quality)
    return pair_to_input(resize_u8(test, input_size), resize_u8(temp, input_size)), meta


def load_pair(test_path, template_path, input_size: int = 640) -> tuple[np.ndarray, PairMeta]:
    """Load a (test, template) pair into the model input [3, S, S] and its coordinate meta."""
    return prepare_pair(read_gray(test_path), read_gray(template_path), input_size,
                        (str(test_path), str(template_path)))
