"""Shared test fixtures that no family owns: board images, preprocessed inputs and a tiny
export of the default family's model (its ``testing`` role). Each family's own tiny models live
in its folder (``pcbedge/families/<family>/testing.py``). Plain functions, not pytest fixtures,
so tests, notebooks and subprocess checks can all call them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def random_pair_input(size: int | tuple[int, int] = 128, seed: int = 0) -> np.ndarray:
    """A preprocessed-looking input [3, H, W] float32: test, template, |test - template|."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    template = rng.random((h, w), dtype=np.float32)
    test = template.copy()
    y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
    test[y:y + 12, x:x + 12] = 1.0 - test[y:y + 12, x:x + 12]
    return np.stack([test, template, np.abs(test - template)]).astype(np.float32)


def write_pair_images(folder: str | Path, size: tuple[int, int] = (200, 150),
                      seed: int = 0) -> tuple[Path, Path]:
    """(test.png, template.png) of ``size`` (w, h) with one bright square on the test image."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    template = rng.integers(20, 60, (h, w), dtype=np.uint8)
    test = template.copy()
    test[h // 3:h // 3 + 20, w // 3:w // 3 + 20] = 230
    tp, mp = folder / "board_test.png", folder / "board_temp.png"
    Image.fromarray(test).save(tp)
    Image.fromarray(template).save(mp)
    return tp, mp


def tiny_bundle(root: str | Path, **export_kwargs) -> tuple[Path, Path]:
    """``(model_dir, bundle_dir)``: a tiny model exported under ``root``, reused when ``root``
    already holds a complete export (tests of several modules share one export per session).
    Tests that modify the bundle must copy it first."""
    from pcbedge.export.exporter import export_model

    root = Path(root)
    from pcbedge.families import DEFAULT_FAMILY, get_family

    tiny = get_family(DEFAULT_FAMILY).module("testing")
    model_dir, bundle_dir = root / tiny.TINY_NAME, root / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        if not (model_dir / "config.json").is_file():
            tiny.tiny_model(root)
        export_kwargs.setdefault("check_boards", 2)
        export_kwargs.setdefault("progress", False)
        export_model(model_dir, bundle_dir, overwrite=True, **export_kwargs)
    return model_dir, bundle_dir
