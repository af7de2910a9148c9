"""The HTML report in a real headless browser: Debian's chromium loads the file, its DOM holds
every section (by id), and its screenshot is a real page (size, colour variety, the verdict
banner's colour near the top). Structure, not pixels: fonts and antialiasing differ between
machines. Skips with a reason where no chromium is installed (apt-get install chromium).
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess

import numpy as np
import pytest

from pcbedge.benchmarks.report_html import render_boxes_png, write_report_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SECTIONS = ("verdict", "gates", "run", "latency", "against-the-baseline", "accuracy", "drift",
            "machine-state", "environment", "gallery")


def _browser() -> str:
    for name in BROWSERS:
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no headless chromium on this machine (Debian: apt-get install chromium)")


def _chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def _report() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(1)
    total = list(rng.gamma(9, 5, 300))
    gates = {"p95_ms_max": {"value": 81.0, "limit": 300.0, "op": "<=", "passed": True,
                            "status": "passed"},
             "max_p95_regression_pct": {"value": 31.0, "limit": 10.0, "op": "<=",
                                        "passed": False, "status": "failed"}}
    acc = {"deeppcb_map": 0.91, "count_exact_match": 0.8, "where_accuracy": 0.7}
    report = {
        "title": "pcbedge bench: x86-cpu", "created_utc": "2026-01-02T03:04:05+00:00",
        "passed": False, "gates": gates, "latency_ms": {"p50": 45.0, "p95": 81.0, "p99": 95.0,
                                                        "n": 300},
        "latency_ms_by_stage": {"total": total, "vision": list(rng.gamma(9, 1, 300))},
        "cold_start_ms": 812.0, "throughput_qps": 21.3, "peak_rss_mb": 412.0,
        "rss_growth_mb": 0.4, "bundle_size_mb": 38.2, "workload": {"n_boards": 48,
                                                                    "n_questions": 300},
        "accuracy": acc,
        "drift": {"available": True, "answer_agreement": 0.97, "n_questions": 300,
                  "box_tolerance_px": 1.0, "intent_agreement": 1.0, "reference": "bundles/export",
                  "reference_accuracy": {**acc, "deeppcb_map": 0.92},
                  "delta": {"deeppcb_map": -0.01, "count_exact_match": 0.0}},
        "compare": {"baseline": "prev/report.json", "baseline_created_utc": "2026-01-01",
                    "min_effect_pct": 10.0, "notes": [], "rows": {
                        "latency_p95": {"baseline": 62.0, "current": 81.0, "delta": 19.0,
                                        "ci": [9.0, 27.0], "p_value": 0.001,
                                        "significant": True, "change": "slower"}}},
        "machine_state": {"busy": True, "action": "flag", "rule": "the rule",
                          "reasons": ["during the latency pass: other processes used 61% of "
                                      "the CPUs (limit 20%)"],
                          "before": {"other_cpu_pct_median": 3.0},
                          "during": {"other_cpu_pct_median": 61.0},
                          "cpu_frequency": {"governor": "absent"},
                          "jetson": {"nvpmodel": "absent"}},
        "environment": {"cpu_model": "test CPU", "threads": 2},
    }
    gray = np.full((640, 640), 180, dtype=np.uint8)
    gray[::40, :] = 40
    png = render_boxes_png(gray, [{"type": "short", "bbox": [100, 100, 160, 150]}],
                           [{"type": "short", "bbox": [104, 98, 158, 152], "confidence": 0.93},
                            {"type": "spur", "bbox": [300, 5, 340, 30], "confidence": 0.41}])
    long_answer = "Found 2 defects: a short at (104, 98)-(158, 152) and a spur at " * 3
    gallery = [{"id": "group1/b1", "png_bytes": png, "n_missed": 0, "n_false": 1,
                "caption": f"Describe all defects. -> {long_answer}"}]
    return report, gallery


def test_report_sections_in_a_headless_browser(tmp_path):
    exe = _browser()
    report, gallery = _report()
    html = write_report_html(tmp_path / "report.html", report, gallery)
    dom = _chromium(exe, "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    ids = re.findall(r'<section id="([^"]+)"', dom.stdout)
    assert [s for s in SECTIONS if s not in ids] == [], ids
    assert ids[0] == "verdict"
    assert "FAILED" in dom.stdout and "Busy machine" in dom.stdout
    assert 'class="legend"' in dom.stdout and "ground truth" in dom.stdout
    shot = tmp_path / "report.png"
    run = _chromium(exe, f"--screenshot={shot}", "--window-size=1200,3000", html.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    assert img.shape[:2] == (3000, 1200) and shot.stat().st_size > 50_000
    colours = np.unique(img[::4, ::4].reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, tables, plots and the gallery, not a blank page
    band = img[60:200, 40:900].reshape(-1, 3).astype(int)  # the verdict banner, red (#b00)
    red = (band[:, 0] > 150) & (band[:, 1] < 40) & (band[:, 2] < 40)
    assert red.mean() > 0.2


def test_gallery_tags_are_legible_and_captions_end_on_a_word():
    from PIL import Image

    gray = np.full((640, 640), 200, dtype=np.uint8)
    png = render_boxes_png(gray, [], [{"type": "open", "bbox": [50, 100, 90, 140],
                                       "confidence": 0.5},
                                      {"type": "open", "bbox": [60, 100, 100, 140],
                                       "confidence": 0.6}])
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    tag = (img[..., 0] == 230) & (img[..., 1] == 0) & (img[..., 2] == 0)
    rows = np.where(tag[:, 50:300].sum(axis=1) > 30)[0]
    assert rows.size >= 2 * 20  # two tags of >= 20 px height (the old bitmap label was 11 px)


def test_gallery_caption_ends_on_a_whole_word():
    from pcbedge.benchmarks.harness import build_gallery
    from pcbedge.benchmarks.workload import load_workload

    wl = load_workload(max_boards=1)
    text = "Found 12 opens: " + ", ".join(f"open at ({i}, {i})-({i + 9}, {i + 9})"
                                          for i in range(40))
    answers = [[{"answer": text, "defects": [], "count": 0} for _ in wl.board_queries(0)]]
    caption = build_gallery(wl, answers)[0]["caption"]
    assert caption.endswith(" [...]") and len(caption) < 240 + 60
    kept = caption.split(" -> ", 1)[1][:-len(" [...]")]
    assert text.startswith(kept) and text[len(kept)] == " "  # cut between words
