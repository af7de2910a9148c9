"""load_pair: the model input, box mapping, EXIF, odd formats and bad files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pcbedge.data.deeppcb import read_list
from pcbedge.data.preprocess import RECIPE, PairMeta, load_pair, read_gray
from pcbedge.errors import InputImageError

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def sample_board(sample_data):
    return read_list(sample_data, "bench.txt")[0]


# ---------------------------------------------------------------- the input tensor


def test_load_pair_shape_dtype_range(sample_board):
    x, meta = load_pair(sample_board.test_path, sample_board.template_path)
    assert x.shape == (3, 640, 640) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert (meta.orig_w, meta.orig_h, meta.input_size) == (640, 640, 640)
    assert (meta.quality.shift_x, meta.quality.shift_y) == (0, 0)
    assert RECIPE["channels"] == ["test", "template", "abs_diff"]


def test_channel_order_is_test_template_absdiff(sample_board):
    x, _ = load_pair(sample_board.test_path, sample_board.template_path)
    test = np.asarray(Image.open(sample_board.test_path).convert("L"), np.float32) / 255
    temp = np.asarray(Image.open(sample_board.template_path).convert("L"), np.float32) / 255
    np.testing.assert_allclose(x[0], test, atol=1e-6)
    np.testing.assert_allclose(x[1], temp, atol=1e-6)
    np.testing.assert_array_equal(x[2], np.abs(x[0] - x[1]))
    assert x[2].max() > 0.5  # the boards differ where the defects are


def test_input_size_is_a_parameter(sample_board):
    x, meta = load_pair(sample_board.test_path, sample_board.template_path, input_size=320)
    assert x.shape == (3, 320, 320) and meta.sx == meta.sy == 2.0


# ---------------------------------------------------------------- a non-640 board


def test_box_mapping_roundtrip():
    meta = PairMeta(orig_w=800, orig_h=600, input_size=640)
    for box in ([0, 0, 800, 600], [200.0, 150.0, 360.0, 270.0], [13.5, 7.25, 14.0, 599.0]):
        np.testing.assert_allclose(meta.to_original(meta.to_input(box)), box, rtol=1e-12)
        np.testing.assert_allclose(meta.to_input(meta.to_original(box)), box, rtol=1e-12)
    assert meta.to_input([0, 0, 800, 600]) == [0, 0, 640, 640]
    assert PairMeta(**meta.as_dict()) == meta


def test_drawn_box_lands_at_the_right_input_pixels(tmp_pair, tmp_pair_geometry):
    x, meta = load_pair(*tmp_pair)
    w, h = tmp_pair_geometry["size"]
    assert (meta.orig_w, meta.orig_h) == (w, h) and x.shape == (3, 640, 640)
    ys, xs = np.nonzero(x[2] > 0.5 * x[2].max())  # the difference channel holds only the box
    found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    expected = meta.to_input(tmp_pair_geometry["box"])
    np.testing.assert_allclose(found, expected, atol=1.0)
    np.testing.assert_allclose(meta.to_original(found), tmp_pair_geometry["box"], atol=1.5)


# ---------------------------------------------------------------- EXIF and odd formats


def _marked(w=80, h=40) -> np.ndarray:
    a = np.zeros((h, w), np.uint8)
    a[:10, :10] = 255  # a white mark in the top-left corner
    return a


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(_marked()).save(path, exif=exif, quality=95)
    raw = np.asarray(Image.open(path))
    assert raw.shape == (40, 80)  # stored unrotated
    arr = read_gray(path)
    assert arr.shape == (80, 40)
    assert arr[:10, -10:].mean() > 200 and arr[:10, :10].mean() < 50  # mark is now top-right
    np.testing.assert_allclose(arr.astype(int), np.rot90(raw, k=-1).astype(int), atol=2)


def test_exif_rotated_pair_meta_uses_displayed_size(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    paths = [tmp_path / "t.jpg", tmp_path / "m.jpg"]
    for p in paths:
        Image.fromarray(_marked(96, 64)).save(p, exif=exif)
    _, meta = load_pair(*paths, input_size=128)   # a 64 px side is under 640 / 5
    assert (meta.orig_w, meta.orig_h) == (64, 96)


def test_16bit_png_becomes_8bit(tmp_path):
    a16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)
    path = tmp_path / "deep.png"
    Image.fromarray(a16).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = read_gray(path)
    assert arr.dtype == np.uint8 and arr.shape == (48, 64)
    np.testing.assert_allclose(arr, np.round(a16 / 65535 * 255), atol=1)


def test_rgb_becomes_grayscale(tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    arr = read_gray(path)
    assert arr.dtype == np.uint8 and arr.shape == (40, 50)
    assert np.all(arr == np.asarray(Image.fromarray(rgb).convert("L")))


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    assert np.all(read_gray(path) == 255)


def test_bytes_input(tmp_pair):
    arr = read_gray(tmp_pair[0].read_bytes())
    assert arr.shape == (600, 800)


# ---------------------------------------------------------------- bad files


def test_template_of_another_size_names_both_files(tmp_path, tmp_pair):
    other = tmp_path / "small_temp.jpg"
    Image.fromarray(np.zeros((600, 640), np.uint8)).save(other)
    with pytest.raises(InputImageError) as e:
        load_pair(tmp_pair[0], other)
    assert str(tmp_pair[0]) in str(e.value) and str(other) in str(e.value)
    assert "640x600" in str(e.value) and "800x600" in str(e.value)


def _bad_file(tmp_path, kind, good_jpg):
    p = tmp_path / f"{kind}.jpg"
    if kind == "corrupt":
        data = bytearray(good_jpg.read_bytes())
        data[200:4000] = bytes(range(256)) * 14 + bytes(3800 - 256 * 14)
        p.write_bytes(bytes(data))
    elif kind == "truncated":
        p.write_bytes(good_jpg.read_bytes()[: good_jpg.stat().st_size // 2])
    elif kind == "zero_byte":
        p.write_bytes(b"")
    elif kind == "not_an_image":
        p.write_text("x1 y1 x2 y2 type\n" * 50)
    elif kind == "header_only":
        p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(20))
    # "missing": never written
    return p


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "zero_byte", "not_an_image",
                                  "header_only", "missing"])
@pytest.mark.parametrize("side", ["test", "template"])
def test_bad_file_is_an_input_image_error(tmp_path, tmp_pair, kind, side):
    bad = _bad_file(tmp_path, kind, tmp_pair[0])
    pair = (bad, tmp_pair[1]) if side == "test" else (tmp_pair[0], bad)
    with pytest.raises(InputImageError) as e:
        load_pair(*pair)
    assert e.value.exit_code == 11
    assert str(bad) in str(e.value)
    assert e.value.fix


def test_bad_bytes_is_an_input_image_error():
    with pytest.raises(InputImageError, match="<bytes>"):
        read_gray(b"definitely not an image")


def test_tiny_image_is_refused(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((16, 100), np.uint8)).save(p)
    with pytest.raises(InputImageError, match="smaller than 32 px"):
        read_gray(p)


def test_huge_image_is_refused_before_decoding(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("1", (8000, 5001)).save(p)  # 40,008,000 pixels, a few KB on disk
    with pytest.raises(InputImageError, match="over 40,000,000 pixels") as e:
        read_gray(p)
    assert str(p) in str(e.value)


def test_dark_16bit_png_stays_dark(tmp_path):
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((40, 40), 200, np.uint16)).save(path)
    assert read_gray(path).max() <= 1
