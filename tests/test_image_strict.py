"""Strict image decoding (issue 20): damaged or truncated JPEG/PNG data is refused, decompression
bombs and non-regular files have their own messages, pairs too small for the model are refused
and small pairs never print numpy warnings, damage no decoder can see is warned about in the
answer, and a damaged calibration image is refused.

The fuzz test corrupts bundled sample boards (bit flips at offsets over the whole file, bursts,
truncations, header edits) and sorts every corrupted file into: refused (InputImageError, by the
check that caught it), harmless (decodes to the very same pixels), warned (a sign of damaged
JPEG data, :func:`pcbedge.data.align.find_damage`, or a residual high enough for the answer's
capture-quality warning), or silent. What it asserts is what the formats allow: PNG carries a
CRC on every chunk, so no PNG corruption is silent; no truncated file and no frame-size edit is
ever decoded; JPEG entropy data has no checksum, so a flipped bit that still decodes to valid
codes is a valid JPEG of a different image, and those are bounded (regression ceiling) and
counted, not claimed to be zero.
"""
from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcbedge.data import image_io, png_check
from pcbedge.data.align import align_pair, find_damage
from pcbedge.data.preprocess import (MAX_PIXELS, load_pair, min_board_side, prepare_pair,
                                     read_gray)
from pcbedge.errors import CalibrationError, InputImageError
from pcbedge.families.pcbvlm.grammar import quality_penalty

from badinputs.cases_images import (SAMPLE_TEMP, entropy_start, flipped, sample_pairs,
                                    silent_flip, strict_flip, with_size)
from badinputs.harness import SAMPLE_JPG, png_header

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pcbedge/data/sample"
REFERENCE = REPO / "pcbedge/families/pcbvlm/reference"


@lru_cache(maxsize=None)
def reference_calibration() -> dict:
    """The shipped model's calibration (its ``quality`` block decides the residual warning)."""
    return json.loads((REFERENCE / "generation_config.json").read_text())["calibration"]


def residual_warning(quality) -> bool:
    """Whether an answer built from this PairQuality carries the capture-quality warning
    (grammar.build_answer: penalty over 0.5 with the reference model's calibration)."""
    return quality_penalty(quality.as_dict(), reference_calibration()) > 0.5


def sample_boards(n: int) -> list[Path]:
    tests = sorted(SAMPLE.rglob("*_test.jpg"))
    return tests[:: max(1, len(tests) // n)][:n]


def temp_of(test: Path) -> Path:
    return test.with_name(test.name.replace("_test", "_temp"))


# --- clean images still decode -------------------------------------------------------------------

def test_every_sample_image_decodes_and_no_clean_pair_is_flagged():
    tests = sorted(SAMPLE.rglob("*_test.jpg"))
    images = sorted(SAMPLE.rglob("*.jpg"))
    assert len(images) >= 100
    for p in images:
        arr = read_gray(p)
        assert arr.dtype == np.uint8 and arr.shape == (640, 640), p
    for t in tests:
        a, m, q = align_pair(read_gray(t), read_gray(temp_of(t)))
        assert find_damage(a, m) == (), t
        _, meta = load_pair(t, temp_of(t), 128)
        assert meta.quality.damage == ()


def test_strict_decoder_is_installed_and_used():
    """simplejpeg is a device dependency: without it JPEG entropy damage goes unseen."""
    assert image_io.strict_jpeg_available()
    data = SAMPLE_JPG.read_bytes()
    assert image_io.check_jpeg_entropy(data, image_io.check_jpeg(data)) is True


def test_odd_but_valid_jpegs_and_pngs_decode():
    """Colour JPEGs of each subsampling, CMYK, progressive, restart markers; PNGs of each kind,
    interlaced (Adam7) included: strict does not mean refusing valid files."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (203, 317), dtype=np.uint8)
    rgb = np.stack([gray, gray[::-1], gray[:, ::-1]], -1)

    def enc(img, fmt="JPEG", **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()
    files = [enc(Image.fromarray(gray)), enc(Image.fromarray(rgb).convert("CMYK")),
             enc(Image.fromarray(rgb), progressive=True), enc(Image.fromarray(rgb), optimize=True),
             enc(Image.fromarray(rgb), restart_marker_blocks=3),
             enc(Image.fromarray(gray), restart_marker_rows=1)]
    files += [enc(Image.fromarray(rgb), subsampling=s) for s in (0, 1, 2)]
    files += [enc(Image.fromarray(gray).convert(m), "PNG") for m in ("L", "RGB", "RGBA", "P",
                                                                       "1", "LA")]
    files += [enc(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), adam7_png(gray)]
    for data in files:
        assert read_gray(data).shape == (203, 317)
    assert np.array_equal(read_gray(adam7_png(gray)), gray)


def adam7_png(gray: np.ndarray) -> bytes:
    """An interlaced 8-bit grey PNG (Pillow writes none)."""
    h, w = gray.shape
    raw = b""
    for x0, y0, dx, dy in png_check._ADAM7:
        sub = gray[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(
            ">I", zlib.crc32(tag + body))
    return (image_io.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --- the named cases ----------------------------------------------------------------------------

def test_damaged_entropy_data_is_refused_with_libjpeg_s_reason(tmp_path):
    p = tmp_path / "flip_test.jpg"
    p.write_bytes(strict_flip())
    with Image.open(p) as im:            # what Pillow alone does: decodes it without a word
        im.load()
    with pytest.raises(InputImageError, match="libjpeg: Corrupt JPEG data") as e:
        read_gray(p)
    assert str(p) in str(e.value) and e.value.exit_code == 11


@pytest.mark.parametrize("size", [(6000, 6000), (1280, 640), (640, 1280), (640, 320)])
def test_a_header_that_lies_about_the_size_is_refused(tmp_path, size):
    p = tmp_path / "lie_test.jpg"
    p.write_bytes(with_size(SAMPLE_JPG.read_bytes(), *size))
    with pytest.raises(InputImageError) as e:
        read_gray(p)
    assert str(p) in str(e.value)
    if size == (6000, 6000):      # refused from the header alone: too little data for 6000x6000
        assert "6000x6000" in str(e.value) and "bytes of image data" in str(e.value)


def test_every_truncation_is_refused():
    data = SAMPLE_JPG.read_bytes()
    png = io.BytesIO()
    Image.open(SAMPLE_JPG).save(png, "PNG")
    for whole in (data, png.getvalue()):
        for cut in [*range(1, len(whole), max(1, len(whole) // 97)), len(whole) - 1,
                    len(whole) - 2, len(whole) - 3]:
            with pytest.raises(InputImageError):
                read_gray(whole[:cut])


@pytest.mark.parametrize("kind", ["jpeg", "png", "gif"])
def test_decompression_bombs_have_their_own_message(kind):
    if kind == "jpeg":
        data = with_size(SAMPLE_JPG.read_bytes(), 60000, 60000)
    elif kind == "png":
        data = png_header(50000, 50000)
    else:                          # Pillow's own bomb check (a format we do not parse)
        buf = io.BytesIO()
        Image.new("L", (10, 10)).save(buf, "GIF")
        data = bytearray(buf.getvalue())
        data[6:10] = struct.pack("<HH", 60000, 60000)
        data = bytes(data)
    with pytest.raises(InputImageError) as e:
        read_gray(data)
    msg = str(e.value)
    assert f"over {MAX_PIXELS:,} pixels" in msg and "decompression bomb" in msg
    assert "corrupt" not in msg and "truncated" not in msg


def test_paths_that_are_not_regular_files_have_their_own_message(tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(InputImageError, match="is a directory, not an image file"):
        read_gray(folder)
    if os.path.exists("/dev/null"):
        with pytest.raises(InputImageError, match="is a character device"):
            read_gray("/dev/null")
    with pytest.raises(InputImageError, match="not found"):
        read_gray(tmp_path / "nope.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe_test.png"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            read_gray(fifo)
        except InputImageError as e:
            result["error"] = str(e)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():               # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert "named pipe (FIFO)" in result["error"]


def _pair(folder: Path, w: int, h: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    temp = np.where(rng.random((h, w)) < 0.3, 0, 255).astype(np.uint8)
    test = temp.copy()
    test[h // 3:h // 3 + max(1, h // 8), w // 3:w // 3 + max(1, w // 8)] ^= 255
    paths = folder / f"p{w}x{h}_test.png", folder / f"p{w}x{h}_temp.png"
    Image.fromarray(test).save(paths[0])
    Image.fromarray(temp).save(paths[1])
    return paths


@pytest.mark.parametrize("size", [(32, 32), (4000, 32), (100, 640)])
def test_pairs_too_small_for_the_model_are_refused(tmp_path, size):
    with pytest.raises(InputImageError) as e:
        load_pair(*_pair(tmp_path, *size), 640)
    msg = str(e.value)
    assert f"{size[0]}x{size[1]}" in msg and "under 128 px" in msg and "input 640x640" in msg
    assert e.value.fix and "128 px" in e.value.fix
    assert min_board_side(640) == 128 and min_board_side(128) == 32


@pytest.mark.parametrize("size", [(32, 32), (4000, 32), (33, 57), (24, 24), (4000, 640),
                                  (640, 48), (65, 65)])
def test_small_and_elongated_pairs_never_warn_and_never_nan(tmp_path, size):
    """A model of input 128 reads boards from 32 px; alignment on any size stays finite and
    silent (the 32x32 pair once printed 'Mean of empty slice' and answered shorts at 1.00)."""
    w, h = size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rng = np.random.default_rng(2)
        temp = np.where(rng.random((h, w)) < 0.3, 0, 255).astype(np.uint8)
        test = np.roll(temp, 1, axis=1)
        a, m, q = align_pair(test, temp)
        assert np.isfinite([q.peak, q.residual]).all()
        if min(size) >= 32:
            x, meta = load_pair(*_pair(tmp_path, w, h), 128)
            assert np.isfinite(x).all() and np.isfinite(meta.quality.residual)
            x, meta = prepare_pair(test, temp, 128)
            assert np.isfinite(x).all()


def test_elongated_board_works_with_the_reference_input_size(tmp_path):
    x, meta = load_pair(*_pair(tmp_path, 4000, 640), 640)
    assert x.shape == (3, 640, 640) and (meta.orig_w, meta.orig_h) == (4000, 640)


# --- damage no decoder sees ---------------------------------------------------------------------

def _clean_pair():
    return read_gray(SAMPLE_JPG), read_gray(SAMPLE_TEMP)


def test_find_damage_names_each_kind_of_jpeg_damage():
    test, temp = _clean_pair()
    assert find_damage(*align_pair(test, temp)[:2]) == ()
    k = 37 * 80 + 21                          # from this block on, in coding order
    y, x = divmod(k, 80)
    flat = test.reshape(-1).copy()
    order = np.arange(640 * 640).reshape(80, 8, 80, 8).transpose(0, 2, 1, 3).reshape(-1)
    offset = flat.copy()
    offset[order[k * 64:]] = np.clip(offset[order[k * 64:]].astype(int) - 40, 0, 255)
    displaced = flat.copy()
    displaced[order[(k + 1) * 64:]] = flat[order[k * 64:-64]]      # one block lost
    pattern = test.astype(int).copy()
    yy, xx = np.mgrid[0:8, 0:8]
    pattern[y * 8:y * 8 + 8, x * 8:x * 8 + 8] += (160 * np.cos(np.pi * (2 * xx + 1) * 5 / 16)
                                                  ).astype(int)
    found = {name: prepare_pair(img.reshape(640, 640).clip(0, 255).astype(np.uint8), temp,
                                128)[1].quality.damage
             for name, img in (("offset", offset), ("displaced", displaced),
                               ("pattern", pattern))}
    assert any(re.search(r"(39|40|41) grey levels darker", f) for f in found["offset"]), found
    assert any("1 block later" in f or "1 block earlier" in f for f in found["displaced"]), found
    assert any(f"block at pixel ({x * 8}, {y * 8})" in f for f in found["pattern"]), found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pcbedge.testing import tiny_bundle
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")


def test_the_warning_reaches_the_answer_and_the_cli(tiny, tmp_path):
    """End to end through the CLI: a refused flip exits 11; a silent flip answers with the
    damage warning; the clean board answers without one."""
    board, silent = tmp_path / "silent_test.jpg", tmp_path / "refused_test.jpg"
    board.write_bytes(silent_flip())
    silent.write_bytes(strict_flip())
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def ask(image):
        return subprocess.run([sys.executable, "-m", "pcbedge", "ask", str(tiny[1]), "--image",
                               str(image), "--template", str(SAMPLE_TEMP), "--json",
                               "where are the defects?"], capture_output=True, text=True,
                              env=env, timeout=300)
    clean, warned, refused = ask(SAMPLE_JPG), ask(board), ask(silent)
    assert clean.returncode == 0 and "Warning" not in json.loads(clean.stdout)["answer"]
    assert warned.returncode == 0, warned.stderr
    ans = json.loads(warned.stdout)
    assert "Warning:" in ans["answer"] and "damaged JPEG data" in ans["answer"]
    assert ans["image_quality"]["damage"]
    assert refused.returncode == 11 and "libjpeg" in refused.stderr + refused.stdout
    assert "Warning" not in warned.stderr and "RuntimeWarning" not in warned.stderr


# --- calibration --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_damaged_calibration_image_is_refused_by_name(tmp_path, kind):
    from pcbedge.calibration.sets import select_calibration_set
    cal = sample_pairs(tmp_path / "cal")
    bad = cal / "b4_test.jpg"
    damaged = strict_flip(bad) if kind == "refused" else silent_flip(bad, cal / "b4_temp.jpg")
    bad.write_bytes(damaged)
    with pytest.raises(CalibrationError) as e:
        select_calibration_set(cal, n=9)
    assert "board b4" in str(e.value) and str(bad) in str(e.value)
    assert ("libjpeg" if kind == "refused" else "looks damaged") in str(e.value)


# --- the fuzz test ------------------------------------------------------------------------------

def _jpeg_corruptions(data: bytes, rng) -> list[tuple[str, bytes]]:
    out = []
    n, start = len(data), entropy_start(data)
    for off in rng.integers(0, n, 48):                                 # anywhere in the file
        out.append(("flip", flipped(data, int(off), int(rng.integers(0, 8)))))
    for off in rng.integers(start, n - 8, 6):                          # 4 random bytes
        b = bytearray(data)
        b[int(off):int(off) + 4] = rng.bytes(4)
        out.append(("burst", bytes(b)))
    for off in rng.integers(start, n - 2, 2):                          # a byte lost / added
        out.append(("delete", data[:int(off)] + data[int(off) + 1:]))
        out.append(("insert", data[:int(off)] + rng.bytes(1) + data[int(off):]))
    for cut in [*rng.integers(2, n, 8), n - 1, n - 2]:
        out.append(("truncate", data[:int(cut)]))
    for w, h in ((6000, 6000), (640, 320), (320, 640), (1280, 640), (648, 640), (640, 648),
                 (640, 639), (0, 640)):
        out.append(("frame-size", with_size(data, w, h)))
    dqt, dht = data.index(b"\xff\xdb"), data.index(b"\xff\xc4")
    for k in rng.integers(0, 64, 2):
        out.append(("dqt", flipped(data, dqt + 5 + int(k), int(rng.integers(0, 8)))))
    for k in rng.integers(0, 16, 2):
        out.append(("dht", flipped(data, dht + 5 + int(k), int(rng.integers(0, 4)))))
    return out


def _png_corruptions(data: bytes, rng) -> list[tuple[str, bytes]]:
    out = []
    n = len(data)
    for off in rng.integers(0, n, 32):
        out.append(("flip", flipped(data, int(off), int(rng.integers(0, 8)))))
    for cut in [*rng.integers(8, n, 6), n - 1, n - 4]:
        out.append(("truncate", data[:int(cut)]))
    for w, h in ((641, 640), (640, 641), (320, 640), (50000, 50000)):   # CRC fixed up
        body = struct.pack(">II", w, h) + data[24:29]
        out.append(("ihdr-size", data[:16] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
                    + data[33:]))
    out.append(("after-iend", data + b"trailing bytes"))
    return out


def _classify(data: bytes, clean: np.ndarray, other: np.ndarray, side: str) -> str:
    try:
        img = read_gray(data)
    except InputImageError as e:
        msg = str(e).splitlines()[0]          # the message, not its fix
        for key, name in (("libjpeg", "strict libjpeg"), ("CRC", "png crc"),
                          ("bytes of image data", "header/data size"),
                          ("over 40,000,000", "bomb"), ("truncated", "truncated"),
                          ("cannot be decoded: ", "structure"),
                          ("smaller than", "size floor"), ("cannot be decoded (", "pillow")):
            if key in msg:
                return f"refused: {name}"
        return "refused: other"
    if img.shape == clean.shape and np.array_equal(img, clean):
        return "harmless: same pixels"
    pair = (img, other) if side == "test" else (other, img)
    try:
        _, meta = prepare_pair(*pair, 640)
    except InputImageError:
        return "refused: pair size"
    if meta.quality.damage:
        return "warned: damage"
    if residual_warning(meta.quality):
        return "warned: residual"
    return "silent"


def test_fuzzed_images_are_refused_warned_or_harmless(record_property):
    rng = np.random.default_rng(2026)
    counts: dict[str, Counter] = {}
    silent_visible = 0
    for test in sample_boards(3):
        temp = temp_of(test)
        clean = {"test": read_gray(test), "temp": read_gray(temp)}
        for side, path in (("test", test), ("temp", temp)):
            other = clean["temp" if side == "test" else "test"]
            data = path.read_bytes()
            buf = io.BytesIO()
            Image.fromarray(clean[side]).save(buf, "PNG")
            for fmt, corrupt in (("jpeg", _jpeg_corruptions(data, rng)),
                                 ("png", _png_corruptions(buf.getvalue(), rng))):
                for kind, bad in corrupt:
                    outcome = _classify(bad, clean[side], other, side)
                    counts.setdefault(f"{fmt} {kind}", Counter())[outcome] += 1
                    if outcome == "silent":
                        diff = np.abs(read_gray(bad).astype(int) - clean[side])
                        silent_visible += int((diff > 64).sum() >= 16)
    total = Counter()
    for c in counts.values():
        total.update(c)
    print("\ncorrupted images:", sum(total.values()))
    for k in sorted(counts):
        print(f"  {k:18s}", dict(sorted(counts[k].items())))
    print("  all:", dict(sorted(total.items())), "; silent with visible damage:", silent_visible)
    record_property("fuzz_cases", sum(total.values()))
    record_property("fuzz_outcomes", json.dumps(dict(total)))

    # PNG: a CRC on every chunk and the inflated size checked: nothing gets through
    for k, c in counts.items():
        if k.startswith("png"):
            assert all(o == "harmless: same pixels" or o.startswith("refused") for o in c), (k, c)
    # no truncated file, no frame-size edit and no damaged table is ever answered silently
    for k in ("jpeg truncate", "jpeg frame-size"):
        assert all(o.startswith("refused") for o in counts[k].elements()), (k, counts[k])
    assert counts["jpeg frame-size"]["refused: header/data size"] >= 1
    # JPEG data without a checksum: flips that decode to valid codes are another valid image.
    # Measured 2026-12 on this corpus: 152 of 477 pixel-changing JPEG corruptions silent (32 %),
    # 34 of them with visible damage (>= 16 pixels off by > 64 grey levels: 7 %); most silent
    # ones are a coefficient's low bits. Regression ceilings, not a claim of zero:
    jpeg = Counter()
    for k, c in counts.items():
        if k.startswith("jpeg"):
            jpeg.update(c)
    changed = sum(v for o, v in jpeg.items() if o != "harmless: same pixels")
    assert jpeg["silent"] <= 0.45 * changed, jpeg
    assert silent_visible <= 0.10 * changed, (silent_visible, changed)
