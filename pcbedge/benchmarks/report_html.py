"""One self-contained HTML benchmark report: hand-drawn inline SVG plots, base64 PNG gallery.

No plotting library: the device-side install is numpy + Pillow, and a single file with no
external assets can be copied off an edge box and opened anywhere. Every section is optional;
a section whose data is absent from the report dict is left out rather than drawn empty.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcbedge.benchmarks.metrics import latency_summary, parse_bbox
from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.errors import InputImageError, OutputError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H = 640, 320
PAD_L, PAD_R, PAD_T, PAD_B = 60, 20, 30, 50
CDF_POINTS = 256  # points per CDF curve: enough to look smooth, small for 20k-sample stages

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}.pass{color:#2a7d2a;font-weight:bold}.fail{color:#b00;
font-weight:bold}figure{display:inline-block;margin:6px;vertical-align:top;max-width:420px}
figure img{max-width:100%;border:1px solid #aaa}figcaption{font-size:14px;
line-height:1.35;overflow-wrap:break-word}
svg text{font-size:11px;font-family:sans-serif}"""


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


# ----------------------------------------------------------------------------- SVG primitives

def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 times a power of ten) covering [lo, hi]."""
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass(frozen=True)
class _Axes:
    """Maps data to pixels inside the plot box; ``log_x`` plots log10(x) (wide latency spreads)."""

    x0: float
    x1: float
    y0: float
    y1: float
    log_x: bool = False

    def px(self, x: float) -> float:
        lo, hi, v = self.x0, self.x1, x
        if self.log_x:
            lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(x, self.x0))
        return PAD_L + (v - lo) / ((hi - lo) or 1.0) * (W - PAD_L - PAD_R)

    def py(self, y: float) -> float:
        return H - PAD_B - (y - self.y0) / ((self.y1 - self.y0) or 1.0) * (H - PAD_T - PAD_B)


def _axes_svg(ax: _Axes, title: str, xlabel: str, ylabel: str, x_ticks: bool = True) -> list[str]:
    out = [f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{_esc(title)}</text>']
    if not x_ticks:
        xt = []
    elif ax.log_x:
        decades = range(math.floor(math.log10(ax.x0)), math.ceil(math.log10(ax.x1)) + 1)
        xt = [10.0 ** k for k in decades if ax.x0 <= 10.0 ** k <= ax.x1]
    else:
        xt = _nice_ticks(ax.x0, ax.x1)
    for t in xt:
        x = ax.px(t)
        out.append(f'<line x1="{x:.1f}" y1="{H - PAD_B}" x2="{x:.1f}" y2="{H - PAD_B + 4}" '
                   f'stroke="#888"/><text x="{x:.1f}" y="{H - PAD_B + 16}" '
                   f'text-anchor="middle">{_fmt(t)}</text>')
    for t in _nice_ticks(ax.y0, ax.y1):
        y = ax.py(t)
        out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">{_esc(xlabel)}</text>'
               f'<text x="14" y="{H / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {H / 2})">{_esc(ylabel)}</text>')
    # The frame goes last so that the light grid lines do not paint over it.
    out.append(f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" '
               f'height="{H - PAD_T - PAD_B}" fill="none" stroke="#888"/>')
    return out


def _legend(names: list[str], x: float = PAD_L + 10, y: float = PAD_T + 14) -> list[str]:
    return [f'<rect x="{x}" y="{y + 16 * i - 9}" width="10" height="10" '
            f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{x + 14}" y="{y + 16 * i}">'
            f'{_esc(n)}</text>' for i, n in enumerate(names)]


def _svg(parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}">' + "".join(parts) + "</svg>")


# ----------------------------------------------------------------------------- plots

def _latency_cdf_svg(by_stage: dict[str, list[float]]) -> str:
    stages = {k: np.sort(np.asarray(v, dtype=np.float64).reshape(-1)) for k, v in by_stage.items()}
    stages = {k: v[np.isfinite(v)] for k, v in stages.items()}
    stages = {k: v for k, v in stages.items() if v.size}
    if not stages:
        return ""
    lo = min(float(v[0]) for v in stages.values())
    hi = max(float(v[-1]) for v in stages.values())
    # Stages differ by orders of magnitude (vision encoder vs full decode): log x shows both.
    log_x = lo > 0 and hi / lo > 50
    ax = _Axes(lo if log_x else 0.0, hi if hi > 0 else 1.0, 0.0, 1.0, log_x)
    xlabel = "latency (ms)" + (", log scale" if log_x else "")
    parts = _axes_svg(ax, "Latency CDF per stage", xlabel, "fraction of runs")
    y95 = ax.py(0.95)
    parts.append(f'<line x1="{PAD_L}" y1="{y95:.1f}" x2="{W - PAD_R}" y2="{y95:.1f}" '
                 f'stroke="#999" stroke-dasharray="4 3"/><text x="{W - PAD_R - 4}" '
                 f'y="{y95 - 4:.1f}" text-anchor="end">P95</text>')
    for i, v in enumerate(stages.values()):
        idx = np.unique(np.linspace(0, v.size - 1, min(v.size, CDF_POINTS)).astype(int))
        pts = " ".join(f"{ax.px(float(v[k])):.1f},{ax.py((k + 1) / v.size):.1f}" for k in idx)
        parts.append(f'<polyline points="{pts}" fill="none" stroke-width="2" '
                     f'stroke="{PALETTE[i % len(PALETTE)]}"/>')
    parts += _legend(list(stages), x=W - PAD_R - 170, y=H - PAD_B - 16 * len(stages))
    return _svg(parts)


def _ap_bars_svg(series: dict[str, dict]) -> str:
    series = {k: v for k, v in series.items() if isinstance(v, dict) and v}
    if not series:
        return ""
    types = list(DEFECT_TYPES) + sorted({t for v in series.values() for t in v} - set(DEFECT_TYPES))
    ax = _Axes(0.0, float(len(types)), 0.0, 1.0)
    parts = _axes_svg(ax, "AP per defect type", "", "AP", x_ticks=False)  # types label the x axis
    slot = (W - PAD_L - PAD_R) / len(types)
    bar = slot * 0.8 / len(series)
    for j, t in enumerate(types):
        x_mid = PAD_L + slot * (j + 0.5)
        parts.append(f'<text x="{x_mid:.1f}" y="{H - PAD_B + 16}" text-anchor="middle">'
                     f'{_esc(t)}</text>')
        for i, vals in enumerate(series.values()):
            x = PAD_L + slot * (j + 0.1) + bar * i
            v = vals.get(t)
            if v is None:
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{H - PAD_B - 4}" '
                             f'text-anchor="middle" fill="#999">n/a</text>')
                continue
            y = ax.py(float(v))
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                         f'height="{H - PAD_B - y:.1f}" fill="{PALETTE[i % len(PALETTE)]}">'
                         f'<title>{_esc(t)}: {_fmt(v)}</title></rect>')
    return _svg(parts + _legend(list(series), x=W - PAD_R - 120))


def _reliability_svg(bins: list[dict], ece) -> str:
    bins = [b for b in bins if isinstance(b, dict) and {"lo", "hi"} <= b.keys()]
    if not bins:
        return ""
    ax = _Axes(0.0, 1.0, 0.0, 1.0)
    parts = _axes_svg(ax, f"Reliability diagram (ECE {_fmt(ece)})", "confidence", "accuracy")
    parts.append(f'<line x1="{ax.px(0)}" y1="{ax.py(0)}" x2="{ax.px(1)}" y2="{ax.py(1)}" '
                 f'stroke="#999" stroke-dasharray="4 3"/>')
    for b in bins:
        if not b.get("count") or b.get("accuracy") is None:
            continue
        x0, x1, y = ax.px(b["lo"]), ax.px(b["hi"]), ax.py(b["accuracy"])
        parts.append(f'<rect x="{x0 + 1:.1f}" y="{y:.1f}" width="{x1 - x0 - 2:.1f}" '
                     f'height="{ax.py(0) - y:.1f}" fill="{PALETTE[0]}" opacity="0.8"/>'
                     f'<text x="{(x0 + x1) / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">'
                     f'n={b["count"]}</text>')
        if b.get("mean_conf") is not None:
            c = b["mean_conf"]
            parts.append(f'<circle cx="{ax.px(c):.1f}" cy="{ax.py(c):.1f}" r="3" '
                         f'fill="{PALETTE[1]}"/>')
    return _svg(parts + _legend(["accuracy", "mean confidence"]))


def _sweep_svg(sweep: list[dict]) -> str:
    pts = [s for s in sweep if isinstance(s, dict)
           and all(isinstance(s.get(k), (int, float)) for k in ("p95_ms", "deeppcb_map"))]
    if not pts:
        return ""
    xs = [float(s["p95_ms"]) for s in pts]
    span = (max(xs) - min(xs)) or max(xs) or 1.0
    ax = _Axes(max(0.0, min(xs) - 0.1 * span), max(xs) + 0.1 * span, 0.0, 1.0)
    parts = _axes_svg(ax, "Accuracy vs P95 latency", "P95 latency (ms)", "DeepPCB mAP")
    for i, s in enumerate(pts):
        x, y = ax.px(float(s["p95_ms"])), ax.py(float(s["deeppcb_map"]))
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{x + 7:.1f}" y="{y - 6:.1f}">{_esc(s.get("label", i))}</text>')
    return _svg(parts)


# ----------------------------------------------------------------------------- tables and gallery

def _table(header: list[str], rows: list[list[str]]) -> str:
    """Cells in ``rows`` must already be escaped HTML."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _gates_html(gates: dict) -> str:
    rows = []
    for name, g in gates.items():
        g = g if isinstance(g, dict) else {"value": g}
        passed = g.get("passed")
        cls = "pass" if passed else "fail" if passed is not None else ""
        verdict = "PASS" if passed else "FAIL" if passed is not None else "n/a"
        rows.append([_esc(name), _esc(_fmt(g.get("value"))), _esc(_fmt(g.get("limit"))),
                     f'<span class="{cls}">{verdict}</span>'])
    return _table(["gate", "value", "limit", "result"], rows)


def _latency_table(by_stage: dict) -> str:
    rows = []
    for stage, ms in by_stage.items():
        if not isinstance(ms, (list, tuple, np.ndarray)) or len(ms) == 0:
            continue
        s = latency_summary(list(ms))
        b = s["p95_bound"]
        cells = [_fmt(s[k]) for k in ("n", "p50", "p90", "p95", "p99", "max")]
        cells.append(f"[{_fmt(b['lower'])}, {_fmt(b['upper'])}]")
        rows.append([_esc(c) for c in [stage] + cells])
    if not rows:
        return ""
    return _table(["stage", "n", "p50", "p90", "p95", "p99", "max", "P95 95% CI"], rows)


def _kv_table(d: dict) -> str:
    rows = [[_esc(k), _esc(_fmt(v))] for k, v in d.items() if not isinstance(v, (dict, list))]
    return _table(["key", "value"], rows) if rows else ""


def _gallery_html(gallery: list[dict]) -> str:
    items = [g for g in gallery if isinstance(g, dict)]
    # Boards the model got wrong are what a reviewer opens the report for: they go first.
    items.sort(key=lambda g: -(int(g.get("n_missed", 0) or 0) + int(g.get("n_false", 0) or 0)))
    figs = []
    for g in items:
        img = ""
        if isinstance(g.get("png_bytes"), (bytes, bytearray)):
            data = base64.b64encode(bytes(g["png_bytes"])).decode("ascii")
            img = f'<img alt="{_esc(g.get("id", ""))}" src="data:image/png;base64,{data}"/>'
        figs.append(f'<figure>{img}<figcaption><b>{_esc(g.get("id", ""))}</b> '
                    f'missed {_esc(g.get("n_missed", 0))}, false {_esc(g.get("n_false", 0))}<br/>'
                    f'{_esc(g.get("caption", ""))}</figcaption></figure>')
    return "".join(figs)


# ----------------------------------------------------------------------------- public API

def _dict(report: dict, key: str) -> dict:
    v = report.get(key)
    return v if isinstance(v, dict) else {}


def _sections(report: dict, gallery: list[dict]) -> list[tuple[str, str]]:
    from pcbedge.benchmarks import report_sections as rs

    acc = _dict(report, "accuracy")
    lat = _dict(report, "latency_ms_by_stage")
    ap = {"IoU>0.33": acc.get("per_type_ap_033"), "IoU>0.5": acc.get("per_type_ap_05")}
    gallery_body = _gallery_html(gallery or [])
    candidates = [
        ("Gates", _gates_html(_dict(report, "gates")) if _dict(report, "gates") else ""),
        ("Run", rs.run_html(report)),
        ("Latency", _latency_cdf_svg(lat) + _latency_table(lat)),
        ("Against the baseline", rs.compare_html(report)),
        ("Accuracy", _kv_table(acc) + _ap_bars_svg(ap)),
        ("Drift", rs.drift_html(report)),
        ("Calibration", _reliability_svg(acc.get("ece_bins") or [], acc.get("ece"))),
        ("Accuracy vs latency", _sweep_svg(report.get("sweep") or [])),
        ("Machine state", rs.machine_html(report)),
        ("Environment", _kv_table(_dict(report, "environment"))),
        ("Gallery", rs.gallery_legend_html() + gallery_body if gallery_body else ""),
    ]
    return [(title, body) for title, body in candidates if body]


def _section_id(title: str) -> str:
    return "-".join(title.lower().split())


def render_report_html(report: dict, gallery: list[dict]) -> str:
    """The report as one HTML string (what :func:`write_report_html` writes). Each section is a
    ``<section id=...>`` (the headless-browser test looks them up)."""
    from pcbedge.benchmarks.report_sections import CSS as CI_CSS, verdict_html

    title = _esc(report.get("title", "pcbedge benchmark report"))
    verdict = verdict_html(report)
    body = (f'<section id="verdict">{verdict}</section>\n' if verdict else "") + "".join(
        f'<section id="{_section_id(t)}"><h2>{_esc(t)}</h2>\n{b}\n</section>\n'
        for t, b in _sections(report, gallery))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{title}'
            f"</title><style>{CSS}\n{CI_CSS}</style></head><body><h1>{title}</h1>\n{body}"
            "</body></html>\n")


def write_report_html(path: str | os.PathLike, report: dict, gallery: list[dict]) -> Path:
    """Writes the report atomically (temp file in the same folder, then rename); returns path."""
    path = Path(path)
    text = render_report_html(report, gallery)
    if not path.parent.is_dir():
        raise OutputError(f"folder {str(path.parent)!r} of the report does not exist",
                          fix="create the output folder first or pick another --out")
    from pcbedge.bundle.atomic import atomic_write_text
    atomic_write_text(path, text)
    return path


def _place_tag(placed: list, box: tuple, tw: float, th: float, size: tuple[int, int]) -> tuple:
    """A label rectangle by the box that overlaps no earlier one: above it, then below it,
    then further rows down; inside the image. Falls back to the first candidate."""
    x1, y1, x2, y2 = box
    tx = min(max(0.0, x1), max(0.0, size[0] - tw))
    rows = [y1 - th] + [y2 + 1 + i * th for i in range(4)] + [y1 - th * (i + 2) for i in range(3)]
    cands = [(tx, min(max(0.0, y), size[1] - th)) for y in rows]
    for x, y in cands:
        if not any(x < p[2] and p[0] < x + tw and y < p[3] and p[1] < y + th for p in placed):
            return (x, y, x + tw, y + th)
    x, y = cands[0]
    return (x, y, x + tw, y + th)


def render_boxes_png(gray: np.ndarray, gt: list[dict], pred: list[dict]) -> bytes:
    """PNG of a grayscale board with ground truth in green and predictions in red ("type conf")."""
    from PIL import Image, ImageDraw, ImageFont  # Pillow only when a gallery is drawn

    if not (isinstance(gray, np.ndarray) and gray.ndim == 2 and gray.dtype == np.uint8
            and gray.size):
        raise InputImageError(f"expected a non-empty HxW uint8 array, got "
                              f"{getattr(gray, 'shape', type(gray))} {getattr(gray, 'dtype', '')}",
                              fix="pass the grayscale test image as loaded (np.uint8, 2-D)")
    img = Image.fromarray(gray).convert("RGB")
    draw = ImageDraw.Draw(img)
    # The gallery shows a 640 px board at ~420 px: a 1/32-of-the-side font reads as ~13 px there
    # (the bitmap default was 6 px on screen). A filled tag keeps it legible on any background.
    side = min(img.size)
    font = ImageFont.load_default(size=max(10, side // 32))
    line = max(2, side // 213)
    for k, d in enumerate(gt):
        draw.rectangle(parse_bbox(d, f"gallery ground truth {k}"), outline=(0, 200, 0),
                       width=line)
    placed: list[tuple[float, float, float, float]] = []
    for k, d in enumerate(pred):
        x1, y1, x2, y2 = parse_bbox(d, f"gallery prediction {k}")
        draw.rectangle((x1, y1, x2, y2), outline=(230, 0, 0), width=line)
    for k, d in enumerate(pred):  # tags after every box, so no box line crosses a tag
        x1, y1, x2, y2 = parse_bbox(d, f"gallery prediction {k}")
        conf = d.get("confidence")
        label = f"{d.get('type', '?')} {conf:.2f}" if isinstance(conf, (int, float)) else \
            str(d.get("type", "?"))
        l, t, r, b = draw.textbbox((0, 0), label, font=font)
        tag = _place_tag(placed, (x1, y1, x2, y2), r - l + 4, b - t + 4, img.size)
        placed.append(tag)
        draw.rectangle(tag, fill=(230, 0, 0))
        draw.text((tag[0] + 2 - l, tag[1] + 2 - t), label, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
