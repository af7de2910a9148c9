"""Question kinds beyond where / how many / is there / describe: totals, verdicts, regions,
nearest to a point, several types, largest / smallest, and character-level noise.

Each kind has train and held-out phrasings (``(train, heldout)`` tuples, as in :mod:`qa`), and
every generated question carries its :class:`pcbedge.data.query.Program`, the meaning a right
answer follows. Numbers (coordinates, radii) are written into the question; the program refers
to them by their order of appearance (slots).
"""
from __future__ import annotations

import random
import string

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.data.query import (NEAR_PX, Program, _area, centre, distance_to_box,
                                extract_numbers, select)


def plural(phrase: str) -> str:
    if phrase.isupper():
        return plural(phrase.lower()).upper()
    if not phrase:
        return phrase
    if phrase.endswith(("s", "x", "ch", "sh")):
        return phrase + "es" if not phrase.endswith("s") else phrase
    if phrase.endswith("y") and not phrase.endswith(("ay", "ey", "oy")):
        return phrase[:-1] + "ies"
    # pluralise the head noun of "hole in the copper"
    for head in (" in the ",):
        if head in phrase:
            a, b = phrase.split(head, 1)
            return plural(a) + head + b
    return phrase + "s"

NEW_KINDS = ("total", "verdict", "region", "nearest", "two_types", "extreme", "typos")

TOTAL = (("how many defects does this board have?", "total defect count?",
          "how many defects are there in total?", "count all the defects.",
          "what is the total number of defects?", "how many faults in total?",
          "give me the total defect count.", "number of defects on the board?",
          "how many problems does this board have?", "how many flaws are there?",
          "total number of defects?", "count every defect on this board.",
          "how many defects did you find?", "defect count?", "how many defects in all?",
          "count the defects.", "how many defects?", "tell me the number of defects.",
          "how many defects altogether?", "overall, how many defects?", "add up the defects."),
         ("how many defects are on it in total?", "what's the overall defect count?",
          "tell me the total number of flaws", "how many faults does it have altogether?",
          "count up all the defects", "what is the defect tally?"))

VERDICT = (("is this board good to ship?", "does it pass inspection?", "pass or fail?",
            "is this board ok?", "can this board ship?", "should this board be rejected?",
            "is the board acceptable?", "does this board pass?", "is it good?", "verdict?",
            "is this board defect-free?", "pass/fail?", "would you accept this board?",
            "is this board fit to ship?", "does the board meet quality standards?",
            "go or no-go?", "does this board pass or fail?", "is the board good?",
            "ok to ship?", "accept or reject?", "can we accept this board?",
            "is the quality good enough to ship?"),
           ("is it ok to ship this one?", "does this one pass the inspection?",
            "should we accept or reject it?", "is the board good enough?", "can we ship it?",
            "fail or pass?"))

# region phrase per scope: (train, heldout). As for the defect synonyms (docs/data.md), a held-out
# phrase recombines words that training phrases use elsewhere ("left-hand side": "right-hand
# side" and "left side" are trained); a word no training phrase uses cannot be read
REGIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "top": (("top half", "upper half", "top part of the board", "upper part", "top portion",
             "upper section", "top zone", "upper edge of the board", "upper area"),
            ("upper side", "top side")),
    "bottom": (("bottom half", "lower half", "bottom part of the board", "lower part",
                "bottom portion", "lower section", "bottom zone", "lower edge of the board",
                "lower area"),
               ("lower side", "bottom side")),
    "left": (("left half", "left side", "left part of the board", "left portion",
              "left section", "left zone", "left area"), ("left-hand side",)),
    "right": (("right half", "right side", "right part of the board", "right portion",
               "right section", "right zone", "right-hand side", "right area"),
              ("right-hand part",)),
    "top_left": (("top-left corner", "upper-left corner", "top left quadrant",
                  "upper left quadrant", "top left", "upper-left section", "top-left zone",
                  "upper left portion"), ("upper left area", "top-left area")),
    "top_right": (("top-right corner", "upper-right corner", "top right quadrant",
                   "upper right quadrant", "top right", "upper-right section",
                   "top-right zone", "upper right portion"),
                  ("upper right area", "top-right area")),
    "bottom_left": (("bottom-left corner", "lower-left corner", "bottom left quadrant",
                     "lower left quadrant", "bottom left", "lower-left section",
                     "bottom-left zone", "lower left portion"),
                    ("lower left area", "bottom-left area")),
    "bottom_right": (("bottom-right corner", "lower-right corner", "bottom right quadrant",
                      "lower right quadrant", "bottom right", "lower-right section",
                      "bottom-right zone", "lower right portion"),
                     ("lower right area", "bottom-right area")),
    "left_third": (("left third", "leftmost third", "left vertical third", "far left third"),
                   ("left-most third",)),
    "middle_column": (("middle column", "central column", "middle vertical third",
                       "central vertical band", "center column"), ("center vertical band",)),
    "right_third": (("right third", "rightmost third", "right vertical third",
                     "far right third", "right-most third"), ("far right vertical third",)),
    "top_third": (("top third", "uppermost third", "upper horizontal third", "top horizontal band"),
                  ("upper third",)),
    "middle_row": (("middle row", "central band", "middle horizontal third", "central row"),
                   ("center band",)),
    "bottom_third": (("bottom third", "lowest third", "lower horizontal third",
                      "bottom horizontal band"), ("lower third",)),
}

# (intent, template, typed) per split; {r} region, {x}/{xs} a defect phrase
REGION_TEMPLATES = (
    (("describe", "anything wrong in the {r}?", False),
     ("describe", "which defects lie in the {r}?", False),
     ("describe", "list the defects in the {r}.", False),
     ("describe", "what defects are in the {r}?", False),
     ("describe", "show all defects in the {r}.", False),
     ("describe", "any problems in the {r}?", False),
     ("describe", "report the defects of the {r}.", False),
     ("count", "how many defects in the {r}?", False),
     ("count", "count the defects in the {r}.", False),
     ("count", "how many {xs} are in the {r}?", True),
     ("count", "number of {xs} in the {r}?", True),
     ("where", "where are the {xs} in the {r}?", True),
     ("where", "locate the {xs} in the {r}.", True),
     ("exists", "is there a {x} in the {r}?", True),
     ("exists", "any {xs} in the {r}?", True),
     # the region first, or the region as the subject
     ("exists", "in the {r}, any {xs}?", True),
     ("count", "in the {r}: how many {xs}?", True),
     ("describe", "in the {r}, what defects are there?", False),
     ("exists", "does the {r} contain a {x}?", True),
     ("count", "how many {xs} does the {r} contain?", True),
     ("describe", "what does the {r} contain?", False),
     ("where", "show the {xs} located in the {r}.", True)),
    (("describe", "what's wrong in the {r}?", False),
     ("describe", "which flaws are in the {r}?", False),
     ("count", "how many defects does the {r} have?", False),
     ("count", "count the {xs} in the {r}", True),
     ("where", "find the {xs} in the {r}", True),
     ("exists", "does the {r} have any {xs}?", True)),
)

# point scopes: (intent, template, scope, slot order, typed); {px} {py} {pr} numbers
POINT_TEMPLATES = (
    (("describe", "any defects near ({px}, {py})?", "near", (0, 1), False),
     ("describe", "what is near x={px}, y={py}?", "near", (0, 1), False),
     ("describe", "defects around ({px}, {py})?", "near", (0, 1), False),
     ("exists", "is there a {x} near ({px}, {py})?", "near", (0, 1), True),
     ("describe", "any defects within {pr} px of ({px}, {py})?", "within", (0, 1, 2), False),
     ("describe", "list defects within {pr} pixels of x={px}, y={py}.", "within", (0, 1, 2),
      False),
     ("count", "how many defects within {pr} px of ({px}, {py})?", "within", (0, 1, 2), False),
     ("describe", "defects around ({px}, {py}) within {pr} px?", "within", (2, 0, 1), False),
     ("describe", "which defects are inside the box ({bx1}, {by1})-({bx2}, {by2})?", "box",
      (0, 1, 2, 3), False),
     ("exists", "any {xs} in the box x1={bx1} y1={by1} x2={bx2} y2={by2}?", "box",
      (0, 1, 2, 3), True),
     ("count", "count the defects between x={bx1} and x={bx2}, y={by1} and y={by2}.", "box",
      (0, 2, 1, 3), False),
     # typed radius questions, and the place first
     ("exists", "any {xs} within {pr} px of ({px}, {py})?", "within", (0, 1, 2), True),
     ("count", "how many {xs} within {pr} pixels of x={px}, y={py}?", "within", (0, 1, 2), True),
     ("exists", "around ({px}, {py}), is there a {x}?", "near", (0, 1), True),
     ("count", "at most {pr} px from ({px}, {py}): how many {xs}?", "within", (0, 1, 2), True),
     ("describe", "inside the rectangle ({bx1}, {by1}), ({bx2}, {by2}), what defects?", "box",
      (0, 1, 2, 3), False),
     ("where", "where are the {xs} inside the box ({bx1}, {by1})-({bx2}, {by2})?", "box",
      (0, 1, 2, 3), True),
     ("exists", "within {pr} px of ({px}, {py}): is there a {x}?", "within", (0, 1, 2), True),
     ("exists", "near ({px}, {py}), any {xs}?", "near", (0, 1), True),
     ("count", "within {pr} pixels of x={px}, y={py}, how many {xs}?", "within", (0, 1, 2),
      True),
     ("describe", "any defects close to x={px}, y={py}?", "near", (0, 1), False),
     ("exists", "is there a {x} close to ({px}, {py})?", "near", (0, 1), True),
     ("describe", "what does the region ({bx1}, {by1})-({bx2}, {by2}) hold?", "box",
      (0, 1, 2, 3), False)),
    (("describe", "anything close to ({px}, {py})?", "near", (0, 1), False),
     ("describe", "what lies within {pr} px of ({px}, {py})?", "within", (0, 1, 2), False),
     ("exists", "within {pr} pixels of ({px}, {py}), any {xs}?", "within", (0, 1, 2), True),
     ("describe", "list defects in the region from ({bx1}, {by1}) to ({bx2}, {by2})", "box",
      (0, 1, 2, 3), False)),
)

NEAREST = (("what's the defect nearest to x={px}, y={py}?", "which defect is closest to ({px}, {py})?",
            "nearest defect to ({px}, {py})?", "closest {x} to ({px}, {py})?",
            "which {x} is nearest to x={px}, y={py}?",
            "find the defect closest to the point ({px}, {py}).",
            "what is the closest defect to ({px}, {py})?",
            "which defect is nearest to the point x={px} y={py}?",
            "which one is closest to ({px}, {py})?", "the closest defect to x={px} y={py}?",
            "nearest {x} to the point ({px}, {py})?"),
           ("what defect lies closest to ({px}, {py})?",
            "which one is nearest to the point {px}, {py}?",
            "the nearest {x} to x={px} y={py}?"))

TWO_TYPES = ((("where", "show me all {xs} and {ys}."), ("where", "where are the {xs} and {ys}?"),
              ("count", "count the {xs} and {ys}."),
              ("count", "how many {xs} and {ys} are there?"), ("exists", "any {xs} or {ys}?"),
              ("where", "find the {xs} and the {ys}."), ("where", "locate every {x} and {y}."),
              ("exists", "are there any {xs} or {ys}?"), ("count", "count the {xs} plus the {ys}."),
              ("where", "locate the {xs}, and the {ys} as well.")),
             (("where", "show the {xs} as well as the {ys}"),
              ("where", "where are all the {xs} and {ys} on it?"),
              ("count", "how many {xs} plus {ys}?"), ("exists", "are there {xs} or {ys}?")))

EXTREME = ((("largest", "what is the largest defect?"), ("largest", "which defect is the biggest?"),
            ("largest", "show the largest {x}."), ("smallest", "what is the smallest defect?"),
            ("smallest", "which defect is the tiniest?"), ("smallest", "smallest {x}?"),
            ("largest", "biggest defect?"), ("largest", "which {x} is the largest?"),
            ("largest", "biggest flaw?"), ("smallest", "what is the tiniest flaw?"),
            ("largest", "show me the biggest {x}."), ("smallest", "which one is the smallest?")),
           (("largest", "which is the largest flaw?"), ("largest", "what's the biggest {x} on it?"),
            ("smallest", "what's the smallest flaw?"), ("smallest", "which {x} is the smallest?")))

_NEIGHBOURS = {c: n for c, n in zip("qwertyuiopasdfghjklzxcvbnm",
                                    "wqrtyuiopoasdfghjkllzxcvbnmn")}


def add_noise(text: str, rng: random.Random, edits: int = 2) -> str:
    """Character-level noise as typed in a hurry: swapped, dropped, doubled or mistyped
    letters, lower case, no punctuation. Digits are never touched (they are coordinates)."""
    s = list(text.lower() if rng.random() < 0.7 else text)
    for _ in range(edits):
        letters = [i for i, c in enumerate(s) if c.isalpha()]
        if len(letters) < 4:
            break
        i = rng.choice(letters)
        op = rng.randrange(4)
        if op == 0 and i + 1 < len(s) and s[i + 1].isalpha():
            s[i], s[i + 1] = s[i + 1], s[i]
        elif op == 1:
            del s[i]
        elif op == 2:
            s.insert(i, s[i])
        else:
            s[i] = _NEIGHBOURS.get(s[i], s[i])
    out = "".join(s)
    if rng.random() < 0.5:
        out = out.rstrip("?.!")
    if rng.random() < 0.3:
        out = "".join(c for c in out if c not in "?!" and c not in string.punctuation.replace(
            "(", "").replace(")", "").replace(",", "").replace("=", "").replace("-", ""))
    return out


def insert_unknown_word(text: str, rng: random.Random, is_known=lambda w: False) -> str:
    """``text`` with one made-up word (4-7 random letters) put between two of its words, so
    that training teaches the decoder that word pieces it has no meaning for carry none: a
    held-out phrasing wraps a known question in words no training phrase uses ("how many faults
    does it have altogether?"). ``is_known(word)`` rejects a draw that is a real vocabulary word
    (which could carry meaning: "short"). Digits are never made, so number slots keep their
    order."""
    words = text.split(" ")
    for _ in range(10):
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7)))
        if not is_known(w):
            break
    else:
        return text
    words.insert(rng.randint(0, len(words)), w)
    return " ".join(words)


def _margin_ok(program: Program, defects: list[dict], size: tuple[int, int], px: float) -> bool:
    """An evaluation question is well posed: no defect centre lies within ``px`` of the scope's
    border (a box error of a pixel or two must not flip the right answer), the nearest defect
    is nearer than the next by ``px``, and the largest / smallest differs from the next by 20 %."""
    w, h = size
    a = program.args()
    for d in defects:
        cx, cy = centre(d["bbox"])
        s = program.scope
        if s in ("left", "right", "top_left", "top_right", "bottom_left", "bottom_right"):
            if abs(cx - w / 2) < px:
                return False
        if s in ("top", "bottom", "top_left", "top_right", "bottom_left", "bottom_right"):
            if abs(cy - h / 2) < px:
                return False
        if s in ("left_third", "middle_column", "right_third"):
            if min(abs(cx - w / 3), abs(cx - 2 * w / 3)) < px:
                return False
        if s in ("top_third", "middle_row", "bottom_third"):
            if min(abs(cy - h / 3), abs(cy - 2 * h / 3)) < px:
                return False
        if s == "box" and min(abs(cx - a["x1"]), abs(cx - a["x2"]), abs(cy - a["y1"]),
                              abs(cy - a["y2"])) < px:
            return False
        r = NEAR_PX if s == "near" else a.get("r")
        if s in ("near", "within") and abs(distance_to_box(d["bbox"], a["x"], a["y"]) - r) < px:
            return False
    picked = select(program, defects, w, h)
    if program.order == "nearest" and len(picked) > 1:
        dist = sorted(distance_to_box(d["bbox"], *program.point()) for d in picked)
        return dist[1] - dist[0] >= px
    if program.order in ("largest", "smallest") and len(picked) > 1:
        areas = sorted(_area(d) for d in picked)
        a0, a1 = (areas[-1], areas[-2]) if program.order == "largest" else (areas[1], areas[0])
        return a0 >= 1.2 * a1
    return True


class NewKinds:
    """The new kinds' sampling; mixed into :class:`pcbedge.data.qa.QuestionGenerator`, which
    provides ``rng``, ``idx`` (0 train, 1 held-out), ``_phrase`` and ``_qa``."""

    def _pick_types(self, present: set[str], n: int) -> list[str]:
        pool = sorted(present) if len(present) >= n and self.rng.random() < 0.8 else \
            list(DEFECT_TYPES)
        return self.rng.sample(pool, n)

    def _point(self, defects, size) -> tuple[int, int]:
        w, h = size
        if defects and self.rng.random() < 0.8:
            cx, cy = centre(self.rng.choice(defects)["bbox"])
            return (int(min(max(cx + self.rng.uniform(-25, 25), 0), w - 1)),
                    int(min(max(cy + self.rng.uniform(-25, 25), 0), h - 1)))
        return self.rng.randrange(w), self.rng.randrange(h)

    def total(self):
        q = self.rng.choice(TOTAL[self.idx])
        return self._qa(q, "total", Program("count"))

    def verdict(self):
        return self._qa(self.rng.choice(VERDICT[self.idx]), "verdict", Program("verdict"))

    def region(self, present, defects=(), size=(640, 640)):
        if self.rng.random() < 0.6:
            scope = self.rng.choice(sorted(REGIONS))
            intent, tpl, typed = self.rng.choice(REGION_TEMPLATES[self.idx])
            t = self._pick_types(present, 1)[0] if typed else None
            x = self._phrase(t) if t else ""
            q = tpl.format(r=self.rng.choice(REGIONS[scope][self.idx]), x=x, xs=plural(x))
            return self._qa(q, "region", Program(intent, (t,) if t else (), scope))
        intent, tpl, scope, slots, typed = self.rng.choice(POINT_TEMPLATES[self.idx])
        t = self._pick_types(present, 1)[0] if typed else None
        x = self._phrase(t) if t else ""
        px, py = self._point(defects, size)
        pr = self.rng.choice((20, 30, 40, 60, 80, 100, 150))
        bx1, by1 = self.rng.randrange(0, size[0] // 2), self.rng.randrange(0, size[1] // 2)
        bx2 = min(size[0], bx1 + self.rng.randrange(80, size[0] // 2 + 80))
        by2 = min(size[1], by1 + self.rng.randrange(80, size[1] // 2 + 80))
        q = tpl.format(px=px, py=py, pr=pr, bx1=bx1, by1=by1, bx2=bx2, by2=by2, x=x,
                       xs=plural(x))
        _, numbers = extract_numbers(q)
        return self._qa(q, "region", Program(intent, (t,) if t else (), scope, slots,
                                             numbers=tuple(numbers)))

    def nearest(self, present, defects=(), size=(640, 640)):
        tpl = self.rng.choice(NEAREST[self.idx])
        t = self._pick_types(present, 1)[0] if "{x}" in tpl else None
        x = self._phrase(t) if t else ""
        pool = [d for d in defects if t is None or d["type"] == t]
        px, py = self._point(pool, size)
        q = tpl.format(px=px, py=py, x=x)
        _, numbers = extract_numbers(q)
        return self._qa(q, "nearest", Program("where", (t,) if t else (), "point", (0, 1),
                                              "nearest", tuple(numbers)))

    def two_types(self, present):
        intent, tpl = self.rng.choice(TWO_TYPES[self.idx])
        a, b = self._pick_types(present, 2)
        pa, pb = self._phrase(a), self._phrase(b)
        q = tpl.format(x=pa, xs=plural(pa), y=pb, ys=plural(pb))
        return self._qa(q, "two_types", Program(intent, (a, b)))

    def extreme(self, present):
        order, tpl = self.rng.choice(EXTREME[self.idx])
        t = self._pick_types(present, 1)[0] if "{x}" in tpl else None
        q = tpl.format(x=self._phrase(t) if t else "")
        return self._qa(q, "extreme", Program("where", (t,) if t else (), order=order))

    def new_kind(self, kind: str, present, defects=(), size=(640, 640)):
        if kind in ("total", "verdict"):
            return getattr(self, kind)()
        if kind in ("region", "nearest"):
            return getattr(self, kind)(present, defects, size)
        return getattr(self, kind)(present)

    def well_posed(self, kind, present, defects, size, margin_px: float = 8.0, tries: int = 30):
        """A new-kind question whose right answer no pixel-level box error can flip."""
        qa = self.new_kind(kind, present, defects, size)
        for _ in range(tries):
            if _margin_ok(qa.program, defects, size, margin_px):
                break
            qa = self.new_kind(kind, present, defects, size)
        return qa


def new_kinds_corpus() -> list[str]:
    """The new kinds' training phrasings (for the tokenizer's vocabulary)."""
    lines = list(TOTAL[0]) + list(VERDICT[0])
    lines += [p for ph in REGIONS.values() for p in ph[0]]
    lines += [t for _i, t, _ty in REGION_TEMPLATES[0]] + [t for _i, t, *_ in POINT_TEMPLATES[0]]
    lines += list(NEAREST[0]) + [t for _i, t in TWO_TYPES[0]] + [t for _o, t in EXTREME[0]]
    return lines
