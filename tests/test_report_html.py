"""The HTML report is one self-contained file, written atomically, with every section drawn."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pcbedge.benchmarks.metrics import expected_calibration_error
from pcbedge.benchmarks.report_html import render_boxes_png, render_report_html, write_report_html
from pcbedge.errors import InputImageError, OutputError


def _full_report() -> dict:
    rng = np.random.default_rng(0)
    ece = expected_calibration_error(list(rng.uniform(size=50)), list(rng.uniform(size=50) < 0.5))
    return {
        "title": "toy <run>",
        "latency_ms_by_stage": {"vision": list(rng.gamma(4, 2, 200)),
                                "decode": list(rng.gamma(4, 80, 200)), "empty": []},
        "accuracy": {"deeppcb_map": 0.71, "ece": ece["ece"], "ece_bins": ece["bins"],
                     "per_type_ap_033": {"open": 0.9, "short": 0.5, "pin_hole": None},
                     "per_type_ap_05": {"open": 0.7, "short": 0.3}},
        "sweep": [{"label": "fp16", "p95_ms": 420.0, "deeppcb_map": 0.74},
                  {"label": "int8", "p95_ms": 260.0, "deeppcb_map": 0.70}],
        "gates": {"p95_ms_max": {"value": 410.2, "limit": 500, "passed": True},
                  "min_deeppcb_map": {"value": 0.71, "limit": 0.8, "passed": False}},
        "environment": {"runtime": "onnxruntime 1.20", "threads": 4, "nested": {"x": 1}},
    }


def _gallery() -> list[dict]:
    gray = np.full((64, 80), 200, dtype=np.uint8)
    gt = [{"type": "open", "bbox": [5, 5, 20, 20]}]
    pred = [{"type": "short", "bbox": [30, 2, 50, 30], "confidence": 0.87}]
    png = render_boxes_png(gray, gt, pred)
    return [{"id": "ok_board", "png_bytes": png, "caption": "fine", "n_missed": 0, "n_false": 0},
            {"id": "bad_board", "png_bytes": png, "caption": "a <miss>", "n_missed": 1,
             "n_false": 1}]


def test_report_is_one_self_contained_file(tmp_path):
    out = write_report_html(tmp_path / "report.html", _full_report(), _gallery())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    text = out.read_text(encoding="utf-8")
    assert text.count("<svg") == 4  # latency CDF, AP bars, reliability, sweep
    assert "data:image/png;base64," in text
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "toy &lt;run&gt;" in text and "a &lt;miss&gt;" in text
    for section in ("Gates", "Latency", "Accuracy", "Calibration", "Accuracy vs latency",
                    "Environment", "Gallery"):
        assert f"<h2>{section}</h2>" in text
    assert "FAIL" in text and "PASS" in text
    assert text.index("bad_board") < text.index("ok_board")  # misses first


def test_missing_sections_are_omitted(tmp_path):
    text = render_report_html({"latency_ms_by_stage": {"total": [10.0, 12.0, 11.0]}}, [])
    assert text.count("<svg") == 1 and "<h2>Gallery</h2>" not in text
    assert "<h2>Gates</h2>" not in text and "<h2>Calibration</h2>" not in text
    assert "<svg" not in render_report_html({}, [])


def test_write_fails_with_typed_error_and_leaves_nothing(tmp_path):
    with pytest.raises(OutputError):
        write_report_html(tmp_path / "missing" / "report.html", {}, [])
    assert list(tmp_path.iterdir()) == []


def test_render_boxes_png_draws_colours():
    gray = np.zeros((40, 40), dtype=np.uint8)
    png = render_boxes_png(gray, [{"type": "open", "bbox": [2, 2, 12, 12]}],
                           [{"type": "spur", "bbox": [20, 20, 35, 35], "confidence": 0.5}])
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape == (40, 40, 3)
    assert tuple(img[2, 6]) == (0, 200, 0)  # GT edge is green
    assert tuple(img[35, 28]) == (230, 0, 0)  # prediction edge is red
    with pytest.raises(InputImageError):
        render_boxes_png(np.zeros((4, 4, 3), dtype=np.uint8), [], [])
