"""Calibration sets: stratified choice, determinism, hash, refusal of bad folders."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcbedge.calibration import CalibrationSet, select_calibration_set
from pcbedge.families.pcbvlm.recipe import iter_vision_inputs
from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.errors import CalibrationError


def _pairs(folder: Path, n: int, size=(96, 80), seed=0) -> Path:
    """``n`` plain-folder pairs ``board{i}_test.png`` / ``board{i}_temp.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        temp = rng.integers(20, 60, (h, w), dtype=np.uint8)
        test = temp.copy()
        test[10:20, 10 + i:20 + i] = 230
        Image.fromarray(test).save(folder / f"board{i}_test.png")
        Image.fromarray(temp).save(folder / f"board{i}_temp.png")
    return folder


def test_sample_calib_list_is_used_and_covers_every_type(sample_data):
    cs = select_calibration_set(sample_data)
    assert isinstance(cs, CalibrationSet) and len(cs) == 16
    calib_ids = {Path(line.split()[0]).stem
                 for line in (sample_data / "calib.txt").read_text().splitlines() if line}
    assert set(cs.to_manifest()["boards"]) == calib_ids
    assert {t for e in cs.entries for t in e.defect_types} == set(DEFECT_TYPES)


def test_same_inputs_same_hash_and_order(sample_data):
    a = select_calibration_set(sample_data, n=10, seed=3, list_file="trainval.txt")
    b = select_calibration_set(sample_data, n=10, seed=3, list_file="trainval.txt")
    assert a.sha256 == b.sha256 and a.to_manifest() == b.to_manifest()
    m = a.to_manifest()
    assert set(m) == {"root", "boards", "files", "sha256", "list_file"} and len(m["files"]) == 20
    assert m["list_file"] == "trainval.txt"
    assert all(not Path(f).is_absolute() for f in m["files"])


def test_round_robin_is_stratified_over_types(sample_data):
    cs = select_calibration_set(sample_data, n=8, seed=1, list_file="trainval.txt")
    assert len(cs) == 8
    assert {t for e in cs.entries for t in e.defect_types} == set(DEFECT_TYPES)
    other = select_calibration_set(sample_data, n=8, seed=2, list_file="trainval.txt")
    assert other.sha256 != cs.sha256   # the seed changes the choice, deterministically


def test_changed_file_changes_hash(tmp_path):
    folder = _pairs(tmp_path / "boards", 9)
    before = select_calibration_set(folder, n=9)
    p = folder / "board3_test.png"
    img = np.asarray(Image.open(p)).copy()
    img[0, 0] ^= 1
    Image.fromarray(img).save(p)
    after = select_calibration_set(folder, n=9)
    assert after.to_manifest()["boards"] == before.to_manifest()["boards"]
    assert after.sha256 != before.sha256


def test_plain_folder_pairs_and_inputs(tmp_path):
    folder = _pairs(tmp_path / "boards", 8)
    cs = select_calibration_set(folder, n=16)      # fewer than asked, at least the minimum
    m = cs.to_manifest()
    assert len(cs) == 8 and sorted(m["boards"]) == sorted(f"board{i}" for i in range(8))
    assert "board0_test.png" in m["files"] and "board0_temp.png" in m["files"]
    assert all(e.defect_types == () for e in cs.entries)
    feeds = list(iter_vision_inputs(cs, 64))
    assert len(feeds) == 8
    x = feeds[0]["pixel_values"]
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_too_few_boards(tmp_path):
    folder = _pairs(tmp_path / "few", 5)
    with pytest.raises(CalibrationError, match=r"holds 5 board\(s\), fewer than the minimum 8"):
        select_calibration_set(folder)
    cs = select_calibration_set(folder, n=5, min_boards=4)   # the minimum is configurable
    assert len(cs) == 5
    with pytest.raises(CalibrationError, match="fewer than the minimum"):
        select_calibration_set(folder, n=3, min_boards=4)


def test_unreadable_board_is_named(tmp_path):
    folder = _pairs(tmp_path / "bad", 8)
    (folder / "board2_temp.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError) as e:
        select_calibration_set(folder)
    assert "board2_temp.png" in str(e.value) and "fix:" in str(e.value)


def test_missing_template_and_size_mismatch(tmp_path):
    folder = _pairs(tmp_path / "m", 8)
    (folder / "board4_temp.png").unlink()
    with pytest.raises(CalibrationError, match="board4_test.png has no template"):
        select_calibration_set(folder)
    folder2 = _pairs(tmp_path / "s", 8)
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(folder2 / "board1_temp.png")
    with pytest.raises(CalibrationError, match="board1"):
        select_calibration_set(folder2)


def test_missing_folder_and_broken_list(tmp_path, sample_data):
    with pytest.raises(CalibrationError, match="does not exist"):
        select_calibration_set(tmp_path / "nope")
    root = tmp_path / "deeppcb"
    shutil.copytree(sample_data, root)
    (root / "calib.txt").write_text("group00041/00041/99999999.jpg group00041/00041_not/x.txt\n")
    with pytest.raises(CalibrationError, match="calibration list"):
        select_calibration_set(root)
