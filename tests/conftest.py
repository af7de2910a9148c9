"""Shared pytest fixtures. Keep each fixture a small, clearly-named function."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DEEPPCB = REPO.parent / "shared" / "data" / "deeppcb"
SAMPLE_DIR = REPO / "pcbedge" / "data" / "sample"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full DeepPCB trainval split beside the repo; the test skips where it is absent."""
    if not (SHARED_DEEPPCB / "trainval.txt").is_file():
        pytest.skip("needs ../shared/data/deeppcb (the DeepPCB trainval split beside the repo)")
    return SHARED_DEEPPCB


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The embedded sample shipped in the package (made by scripts/make_sample.py)."""
    return SAMPLE_DIR


# The synthetic pair: an 800x600 board with one white rectangle on the test image only.
PAIR_SIZE = (800, 600)                 # (width, height), deliberately not 640x640
PAIR_DEFECT_BOX = (200, 150, 360, 270)  # x1, y1, x2, y2 (x2, y2 exclusive) in original pixels


@pytest.fixture
def tmp_pair(tmp_path) -> tuple[Path, Path]:
    """(test.jpg, template.jpg) of size PAIR_SIZE; the test image has PAIR_DEFECT_BOX filled."""
    w, h = PAIR_SIZE
    template = np.full((h, w), 40, np.uint8)
    test = template.copy()
    x1, y1, x2, y2 = PAIR_DEFECT_BOX
    test[y1:y2, x1:x2] = 230
    test_path, temp_path = tmp_path / "board_test.jpg", tmp_path / "board_temp.jpg"
    Image.fromarray(test).save(test_path, quality=95)
    Image.fromarray(template).save(temp_path, quality=95)
    return test_path, temp_path


@pytest.fixture
def tmp_pair_geometry() -> dict:
    """What :func:`tmp_pair` drew: ``{"size": (w, h), "box": (x1, y1, x2, y2)}``."""
    return {"size": PAIR_SIZE, "box": PAIR_DEFECT_BOX}
