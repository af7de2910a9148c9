"""Images decoded strictly (issue 20): damaged JPEG entropy data, a header that claims more
pixels than the data holds, decompression bombs, paths that are not regular files, pairs too
small for the model, and a damaged calibration image. The corruption helpers here are shared
with tests/test_image_strict.py (which fuzzes many more corruptions than the catalogue lists)."""
from __future__ import annotations

import os
import shutil
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from badinputs.cases_core import bad_board, build
from badinputs.harness import REPO, SAMPLE_JPG, Call, Env, Q, ask, case, png_header

REFERENCE = REPO / "pcbedge/families/pcbvlm/reference"   # input 640: reads boards >= 128 px
SAMPLE_TEMP = SAMPLE_JPG.with_name(SAMPLE_JPG.name.replace("_test", "_temp"))


# --- corruptions (deterministic: a fixed search over one sample board) ---------------------------

def flipped(data: bytes, offset: int, bit: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def entropy_start(data: bytes) -> int:
    """The first entropy-coded byte of a baseline JPEG (after its SOS segment)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + ((data[sos + 2] << 8) | data[sos + 3])


def with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming ``width`` x ``height``."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def _flips(data: bytes, n: int = 400):
    rng = np.random.default_rng(20)
    start = entropy_start(data)
    for off, bit in zip(rng.integers(start, len(data) - 2, n), rng.integers(0, 8, n)):
        yield int(off), int(bit)


@lru_cache(maxsize=None)
def strict_flip(path: Path = SAMPLE_JPG) -> bytes:
    """The board with one entropy-data bit flipped that Pillow decodes silently and the strict
    decoder refuses (libjpeg warns about it)."""
    from pcbedge.data.preprocess import read_gray
    from pcbedge.errors import InputImageError
    data = path.read_bytes()
    for off, bit in _flips(data):
        bad = flipped(data, off, bit)
        try:
            read_gray(bad)
        except InputImageError as e:
            if "libjpeg" in str(e):
                return bad
    raise AssertionError("no flip the strict decoder refuses")


@lru_cache(maxsize=None)
def silent_flip(path: Path = SAMPLE_JPG, template: Path = SAMPLE_TEMP) -> bytes:
    """The board with one entropy-data bit flipped that every decoder accepts (a valid JPEG of
    another image) and that :func:`pcbedge.data.align.find_damage` sees against its template."""
    from pcbedge.data.align import align_pair, find_damage
    from pcbedge.data.preprocess import read_gray
    from pcbedge.errors import InputImageError
    data, temp = path.read_bytes(), read_gray(template)
    for off, bit in _flips(data):
        bad = flipped(data, off, bit)
        try:
            test = read_gray(bad)
        except InputImageError:
            continue
        if find_damage(*align_pair(test, temp)[:2]):
            return bad
    raise AssertionError("no silent flip that find_damage sees")


# --- damaged data --------------------------------------------------------------------------------

case("ask-corrupt-entropy-jpeg", "InputImageError", bad_board(
    "flip_test.jpg", lambda: strict_flip(), ("flip_test.jpg", "cannot be decoded", "libjpeg"),
    size=(640, 640)))
case("ask-jpeg-header-size-lie", "InputImageError", bad_board(
    "lie_test.jpg", lambda: with_size(SAMPLE_JPG.read_bytes(), 6000, 6000),
    ("lie_test.jpg", "6000x6000", "bytes of image data"), size=(640, 640)))
case("ask-decompression-bomb", "InputImageError", bad_board(
    "bomb_test.png", lambda: png_header(50000, 50000),
    ("bomb_test.png", "50000x50000", "before decoding", "decompression bomb")))


# --- paths that are not regular files ------------------------------------------------------------

@case("ask-image-is-directory", "InputImageError")
def _(env: Env) -> Call:
    folder = env.tmp / "boards_test.png"
    folder.mkdir()
    return Call(ask(env, folder, env.pair()[1]), ("boards_test.png", "is a directory"))


@case("ask-image-is-fifo", "InputImageError")
def _(env: Env) -> Call:
    # a subprocess: if the FIFO were ever opened for reading, the call would block, not hang
    # the test session (the harness times it out)
    fifo = env.tmp / "pipe_test.png"
    os.mkfifo(fifo)
    return Call(ask(env, fifo, env.pair()[1]), ("pipe_test.png", "named pipe (FIFO)"),
                subprocess=True)


case("ask-image-is-device", "InputImageError", lambda env: Call(
    ask(env, "/dev/null", env.pair()[1]), ("/dev/null", "character device")))


# --- pairs the model cannot read -----------------------------------------------------------------

def reference_pair(env: Env, size: tuple[int, int]) -> Call:
    """``ask --model <reference>`` (input 640) on a blank pair of ``size`` (w, h)."""
    w, h = size
    paths = []
    for kind in ("test", "temp"):
        p = env.tmp / f"small_{kind}.png"
        Image.new("L", (w, h), 40).save(p)
        paths.append(p)
    return Call(["ask", "--model", REFERENCE, "--image", paths[0], "--template", paths[1], Q],
                ("small_test.png", f"{w}x{h}", "under 128 px", "input 640x640"))


case("ask-tiny-pair", "InputImageError", lambda env: reference_pair(env, (32, 32)))
case("ask-elongated-thin-pair", "InputImageError", lambda env: reference_pair(env, (4000, 32)))


# --- calibration ---------------------------------------------------------------------------------

def sample_pairs(folder: Path, n: int = 9) -> Path:
    """A plain calibration folder: ``n`` sample boards as b<i>_test.jpg + b<i>_temp.jpg."""
    folder.mkdir()
    tests = sorted((REPO / "pcbedge/data/sample").rglob("*_test.jpg"))[:n]
    for i, t in enumerate(tests):
        shutil.copyfile(t, folder / f"b{i}_test.jpg")
        shutil.copyfile(t.with_name(t.name.replace("_test", "_temp")), folder / f"b{i}_temp.jpg")
    return folder


def damaged_calibration(names: tuple[str, ...], corrupt) -> callable:
    def make(env: Env) -> Call:
        cal = sample_pairs(env.tmp / "cal")
        test, temp = cal / "b4_test.jpg", cal / "b4_temp.jpg"
        test.write_bytes(corrupt(test, temp))
        return Call(build(env, "--calibration", str(cal)), ("board b4", "b4_test.jpg", *names),
                    absent=(env.tmp / "out",))
    return make


case("build-calibration-corrupt-image", "CalibrationError", damaged_calibration(
    ("libjpeg",), lambda test, temp: strict_flip(test)))
case("build-calibration-damaged-image", "CalibrationError", damaged_calibration(
    ("looks damaged",), lambda test, temp: silent_flip(test, temp)))
