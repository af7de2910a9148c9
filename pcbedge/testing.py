"""Shared test fixtures: tiny random-weight models built in-process (no downloads).

Plain functions, not pytest fixtures, so tests, notebooks and subprocess checks can all call them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_NUM_REGIONS = 8


def tiny_pcbvlm_model(*, input_size: int = 128, seed: int = 0, num_regions: int = TINY_NUM_REGIONS):
    """A random-weight PcbVlm with 2 decoder layers and d_model 32 (seconds to export)."""
    import torch

    from pcbedge.data.qa import vocabulary_corpus
    from pcbedge.models.pcbvlm.config import PcbVlmConfig, TextConfig, VisionConfig
    from pcbedge.models.pcbvlm.model import PcbVlm
    from pcbedge.models.pcbvlm.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(vocabulary_corpus(), num_regions)
    cfg = PcbVlmConfig(
        input_size=input_size,
        vision=VisionConfig(widths=(8, 8, 16, 16, 32), fpn_ch=16, head_ch=16,
                            num_regions=num_regions),
        text=TextConfig(vocab_size=tok.get_vocab_size(), num_regions=num_regions, d_model=32,
                        n_layers=2, n_heads=2, d_ff=64))
    model = PcbVlm(cfg, tok)
    with torch.no_grad():  # non-zero type/pointer embeddings so every parameter is exercised
        for p in (model.decoder.type_vis, model.decoder.type_reg, model.decoder.ptr_in):
            p.normal_(std=0.1)
        # a random head gives nearly equal heatmap scores everywhere (~0.104); ORT and torch
        # then rank near-ties (1e-7 apart) differently. Spread the logits like a trained head.
        model.vision.head.heat[-1].weight.mul_(25.0)
    return model.eval()


def tiny_pcbvlm(tmp_path: str | Path, *, input_size: int = 128, seed: int = 0,
                name: str = "tiny-pcbvlm") -> Path:
    """Save a tiny random PcbVlm under ``tmp_path/name`` and return that model folder."""
    out = Path(tmp_path) / name
    tiny_pcbvlm_model(input_size=input_size, seed=seed).save_pretrained(out)
    return out


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
    model_dir, bundle_dir = root / "tiny-pcbvlm", root / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        if not (model_dir / "config.json").is_file():
            tiny_pcbvlm(root)
        export_kwargs.setdefault("check_boards", 2)
        export_kwargs.setdefault("progress", False)
        export_model(model_dir, bundle_dir, overwrite=True, **export_kwargs)
    return model_dir, bundle_dir
