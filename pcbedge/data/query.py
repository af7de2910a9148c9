"""What a question asks, independent of any model: the query program and its meaning.

An inspector's question reduces to a small program: an intent (where / count / exists /
describe / verdict), the defect types asked for (none = every type), a scope on the board (the
whole board, a half, quadrant or third, a box in pixels, near a point, within N px of a point)
and the order the defects are listed in (reading order, nearest to a point, largest, smallest).
Numbers in the question (coordinates, radii) are *slots*: ``<n_0>``, ``<n_1>``, ... in order of
appearance, and the program refers to them by index, so a model copies a number by pointing at
it rather than spelling it.

Given a board's defect list (type and box in original pixels), :func:`select` and
:func:`arrange` give exactly what a right answer reports, for the model's answer (its decoder
points only at what the program admits) and for the ground truth (bench scoring) alike.
Pure Python: runs on device.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

INTENTS = ("where", "count", "exists", "describe", "verdict")
# scope name -> number of slots it takes (in this order of meaning)
SCOPES: dict[str, tuple[str, ...]] = {
    "board": (), "top": (), "bottom": (), "left": (), "right": (),
    "top_left": (), "top_right": (), "bottom_left": (), "bottom_right": (),
    "left_third": (), "middle_column": (), "right_third": (),
    "top_third": (), "middle_row": (), "bottom_third": (),
    "point": ("x", "y"),             # a reference point only (for "nearest to"); whole board
    "near": ("x", "y"),              # within NEAR_PX of the point
    "within": ("r", "x", "y"),       # within r px of the point
    "box": ("x1", "y1", "x2", "y2"),  # defect centre inside the box
}
POINT_SCOPES = ("point", "near", "within")
ORDERS = ("reading", "nearest", "largest", "smallest")
NEAR_PX = 50.0        # "near (x, y)": a defect whose box comes within this many pixels
READING_ROW_PX = 32.0  # reading order: rows of this height, top to bottom, left to right
MAX_SLOTS = 8
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

SCOPE_TEXT = {
    "board": "", "top": " in the top half", "bottom": " in the bottom half",
    "left": " in the left half", "right": " in the right half",
    "top_left": " in the top-left quadrant", "top_right": " in the top-right quadrant",
    "bottom_left": " in the bottom-left quadrant", "bottom_right": " in the bottom-right quadrant",
    "left_third": " in the left third", "middle_column": " in the middle third (columns)",
    "right_third": " in the right third", "top_third": " in the top third",
    "middle_row": " in the middle third (rows)", "bottom_third": " in the bottom third",
}


def extract_numbers(text: str) -> tuple[str, list[float]]:
    """``text`` with its first MAX_SLOTS numbers replaced by `` <n_i> `` and their values."""
    values: list[float] = []

    def sub(m: re.Match) -> str:
        if len(values) >= MAX_SLOTS:
            return m.group(0)
        values.append(float(m.group(0)))
        return f" <n_{len(values) - 1}> "

    return _NUMBER.sub(sub, text), values


@dataclass(frozen=True)
class Program:
    """A question's meaning. ``types`` empty = every type; ``slots`` index the question's
    numbers in the order the scope's fields take them (see SCOPES)."""
    intent: str = "describe"
    types: tuple[str, ...] = ()
    scope: str = "board"
    slots: tuple[int, ...] = ()
    order: str = "reading"
    numbers: tuple[float, ...] = field(default=(), compare=False)

    def args(self) -> dict[str, float]:
        names = SCOPES[self.scope]
        return {n: float(self.numbers[i]) for n, i in zip(names, self.slots)
                if 0 <= i < len(self.numbers)}

    def point(self) -> tuple[float, float] | None:
        a = self.args()
        return (a["x"], a["y"]) if "x" in a and "y" in a else None

    def scope_text(self) -> str:
        a = self.args()
        if self.scope == "box" and len(a) == 4:
            x1, x2 = sorted((a["x1"], a["x2"]))
            y1, y2 = sorted((a["y1"], a["y2"]))
            return f" inside ({x1:g}, {y1:g})-({x2:g}, {y2:g})"
        if self.scope == "near" and len(a) == 2:
            return f" within {NEAR_PX:g} px of ({a['x']:g}, {a['y']:g})"
        if self.scope == "within" and len(a) == 3:
            return f" within {a['r']:g} px of ({a['x']:g}, {a['y']:g})"
        return SCOPE_TEXT.get(self.scope, "")

    def to_dict(self) -> dict:
        return {"intent": self.intent, "types": list(self.types) or "all",
                "scope": self.scope, "scope_args": self.args(), "order": self.order}


def centre(box) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2


def distance_to_box(box, x: float, y: float) -> float:
    """Euclidean distance from (x, y) to the box (0 inside it)."""
    dx = max(float(box[0]) - x, 0.0, x - float(box[2]))
    dy = max(float(box[1]) - y, 0.0, y - float(box[3]))
    return math.hypot(dx, dy)


def in_scope(program: Program, box, width: float, height: float) -> bool:
    """Whether a defect with ``box`` (original pixels) lies in the program's scope."""
    cx, cy = centre(box)
    s, a = program.scope, program.args()
    halves = {"top": cy < height / 2, "bottom": cy >= height / 2,
              "left": cx < width / 2, "right": cx >= width / 2}
    if s in halves:
        return halves[s]
    if s in ("top_left", "top_right", "bottom_left", "bottom_right"):
        v, h = s.split("_")
        return halves[v] and halves[h]
    col, row = min(int(3 * cx / width), 2), min(int(3 * cy / height), 2)
    thirds = {"left_third": col == 0, "middle_column": col == 1, "right_third": col == 2,
              "top_third": row == 0, "middle_row": row == 1, "bottom_third": row == 2}
    if s in thirds:
        return thirds[s]
    if s == "box" and len(a) == 4:
        x1, x2 = sorted((a["x1"], a["x2"]))
        y1, y2 = sorted((a["y1"], a["y2"]))
        return x1 <= cx <= x2 and y1 <= cy <= y2
    if s == "near" and len(a) == 2:
        return distance_to_box(box, a["x"], a["y"]) <= NEAR_PX
    if s == "within" and len(a) == 3:
        return distance_to_box(box, a["x"], a["y"]) <= a["r"]
    return True  # board, point


def select(program: Program, defects: list[dict], width: float, height: float) -> list[dict]:
    """The defects (dicts with ``type`` and ``bbox``) a right answer to ``program`` reports."""
    return [d for d in defects
            if (not program.types or d["type"] in program.types)
            and in_scope(program, d["bbox"], width, height)]


def _reading_key(d: dict) -> tuple:
    cx, cy = centre(d["bbox"])
    return (int(cy // READING_ROW_PX), cx, cy)


def _area(d: dict) -> float:
    b = d["bbox"]
    return max(0.0, float(b[2]) - float(b[0])) * max(0.0, float(b[3]) - float(b[1]))


def arrange(program: Program, defects: list[dict]) -> list[dict]:
    """``defects`` in the documented order: nearest first (distance from the point to the box)
    for ``nearest``, largest / smallest box area first, reading order otherwise and on ties."""
    out = sorted(defects, key=_reading_key)
    p = program.point()
    if program.order == "nearest" and p is not None:
        out.sort(key=lambda d: distance_to_box(d["bbox"], *p))
    elif program.order == "largest":
        out.sort(key=lambda d: -_area(d))
    elif program.order == "smallest":
        out.sort(key=_area)
    return out
