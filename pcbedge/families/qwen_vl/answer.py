"""Parse a Qwen-VL reply into the pcbedge answer JSON (torch-free).

Two answer formats are read, whichever the reply holds:

* grounding tokens: ``<|object_ref_start|>short<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)
  <|box_end|>`` (the type may also be the word just before the box);
* JSON: ``{"defects": [{"type": "short", "bbox_2d": [x1, y1, x2, y2]}, ...]}`` (a bare list of
  such objects, or one inside a ```json fence, also parses).

Box coordinates are on the 0..1000 grid (Qwen2-VL, ``norm1000``) or in pixels of the resized
model input (Qwen2.5-VL, ``resized_pixels``), and are mapped back to original image pixels. A
reply that holds neither format (and does not say "no defects") is reported as unparsed:
``parse_error`` set, count 0, no defects: never passed on as a defect. Unknown type names are
dropped with a note.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

BOX_RE = re.compile(
    r"(?:<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>\s*\(\s*(?P<x1>-?\d+(?:\.\d+)?)\s*,\s*(?P<y1>-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(?P<x2>-?\d+(?:\.\d+)?)\s*,\s*(?P<y2>-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>")
WORD_BEFORE_RE = re.compile(r"([A-Za-z][A-Za-z_\- ]*?)\s*[:=]?\s*$")
NO_DEFECT_RE = re.compile(r"\bno\s+(?:\w+\s+)?defects?\b|\bdefect[- ]free\b", re.IGNORECASE)
SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>")
ALIASES = {"pinhole": "pin_hole", "pin hole": "pin_hole", "pin-hole": "pin_hole",
           "mouse bite": "mousebite", "mouse_bite": "mousebite", "mouse-bite": "mousebite",
           "copper": "spurious_copper", "spurious copper": "spurious_copper",
           "spurious-copper": "spurious_copper", "shorts": "short", "opens": "open",
           "spurs": "spur", "mousebites": "mousebite"}


@dataclass(frozen=True)
class BoxFrame:
    """How reply coordinates map to original pixels: ``coords`` is ``norm1000`` or
    ``resized_pixels``; ``resized`` and ``original`` are (height, width)."""

    coords: str
    resized: tuple[int, int]
    original: tuple[int, int]

    def to_original(self, box) -> list[float]:
        oh, ow = self.original
        if self.coords == "norm1000":
            sx, sy = ow / 1000.0, oh / 1000.0
        else:
            sx, sy = ow / self.resized[1], oh / self.resized[0]
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((min(max(x1 * sx, 0.0), ow), min(max(x2 * sx, 0.0), ow)))
        y1, y2 = sorted((min(max(y1 * sy, 0.0), oh), min(max(y2 * sy, 0.0), oh)))
        return [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]


def canonical_type(name, known: tuple[str, ...]) -> str | None:
    if not isinstance(name, str):
        return None
    t = name.strip().lower()
    t = ALIASES.get(t, t)
    t = t.replace(" ", "_").replace("-", "_")
    t = ALIASES.get(t, t)
    return t if t in known else None


def _grounding(text: str) -> list[tuple[list[str], list[float]]]:
    """(candidate type names, box) per grounding box: the object_ref, or else the last two
    words and the last word right before the box."""
    found = []
    for m in BOX_RE.finditer(text):
        refs = [m.group("ref")] if m.group("ref") is not None else []
        if not refs:
            before = SPECIAL_RE.sub(" ", text[:m.start()]).rstrip().rsplit("\n", 1)[-1]
            w = WORD_BEFORE_RE.search(before[-40:])
            words = w.group(1).split() if w else []
            refs = [" ".join(words[-2:]), words[-1]] if words else []
        found.append((refs, [float(m.group(k)) for k in ("x1", "y1", "x2", "y2")]))
    return found


def _json_items(text: str):
    """The defect list of a JSON reply, or None when the reply holds no JSON answer."""
    clean = SPECIAL_RE.sub("", text)
    fence = re.search(r"```(?:json)?\s*(.*?)```", clean, re.DOTALL)
    body = fence.group(1) if fence else clean
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(body[min(starts):])
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict):
        obj = obj.get("defects")
    return obj if isinstance(obj, list) else None


def parse_reply(text: str, frame: BoxFrame, known: tuple[str, ...], *,
                complete: bool = True) -> dict:
    """The answer JSON (``answer``, ``intent``, ``filter``, ``count``, ``defects``,
    ``complete``, ``format``, ``notes`` and ``parse_error`` when unparsed) of one reply."""
    notes: list[str] = []
    items = _grounding(text)
    fmt = "grounding"
    if not items:
        parsed = _json_items(text)
        if parsed and not any(isinstance(d, dict) for d in parsed):
            return _unparsed(text, complete)   # e.g. a bare list of numbers
        if parsed is not None:
            fmt, items = "json", []
            for d in parsed:
                box = d.get("bbox_2d", d.get("bbox")) if isinstance(d, dict) else None
                if (not isinstance(box, list) or len(box) != 4
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   for v in box)):
                    notes.append(f"dropped an entry without a 4-number bbox_2d: {d!r}"[:200])
                    continue
                items.append(([d.get("type", d.get("label"))], box))
        elif NO_DEFECT_RE.search(SPECIAL_RE.sub(" ", text)):
            fmt = "text"
        else:
            return _unparsed(text, complete)
    defects = []
    for names, box in items:
        t = next((c for c in (canonical_type(n, known) for n in names) if c), None)
        if t is None:
            name = names[-1] if names else None
            notes.append(f"dropped a box of unknown defect type {name!r} "
                         f"(known: {', '.join(known)})")
            continue
        x1, y1, x2, y2 = frame.to_original(box)
        defects.append({"type": t, "bbox": [x1, y1, x2, y2],
                        "center": [round((x1 + x2) / 2, 1), round((y1 + y2) / 2, 1)],
                        "confidence": None})
    n = len(defects)
    answer = ("No defects found." if n == 0 else
              f"Found {n} defect{'s' if n != 1 else ''}: " + "; ".join(
                  f"{d['type']} at ({d['bbox'][0]:.0f}, {d['bbox'][1]:.0f})-"
                  f"({d['bbox'][2]:.0f}, {d['bbox'][3]:.0f})" for d in defects) + ".")
    if not complete:
        answer += " (answer cut at the token limit)"
    return {"answer": answer, "intent": "locate", "filter": None, "count": n,
            "defects": defects, "complete": complete, "format": fmt, "notes": notes}


def _unparsed(text: str, complete: bool) -> dict:
    why = ("the reply holds no grounding boxes, no JSON defect list and no 'no defects' "
           "statement")
    if not complete:
        why += " (it was cut at the token limit)"
    return {"answer": "The model's reply could not be parsed.", "intent": "unparsed",
            "filter": None, "count": 0, "defects": [], "complete": complete, "format": None,
            "notes": [], "parse_error": why}
