"""Reader for the DeepPCB layout (test/template pairs, `x1 y1 x2 y2 type` annotations, list files).

The six defect types use canonical names; DeepPCB numbers them 1..6 in this order.
The fixed train/validation split of trainval is by board id: within each board group, the last
20% of the ids (sorted) are validation. Contiguous blocks keep overlapping neighbouring crops of
one panel on the same side of the split (see docs/data.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pcbedge.errors import DatasetError, InputImageError

log = logging.getLogger(__name__)

DEFECT_TYPES: tuple[str, ...] = ("open", "short", "mousebite", "spur", "spurious_copper", "pin_hole")
DEEPPCB_TYPE_IDS = {i + 1: name for i, name in enumerate(DEFECT_TYPES)}
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Defect:
    type: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original image's pixels

    def __post_init__(self):
        if self.type not in DEFECT_TYPES:
            raise DatasetError(f"unknown defect type {self.type!r}",
                               fix=f"use one of: {', '.join(DEFECT_TYPES)}")


@dataclass(frozen=True)
class Board:
    id: str
    group: str
    test_path: Path
    template_path: Path
    defects: tuple[Defect, ...] = field(default=())
    annotation_path: Path | None = None
    list_line: int | None = field(default=None, compare=False)  # its line in the list file


def parse_annotation(path: Path, image_size: tuple[int, int] | None = None,
                     image: Path | None = None) -> tuple[Defect, ...]:
    """Parse one DeepPCB annotation file; a bad line is a DatasetError naming file and line.

    Boxes are pixel corners: ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``. The upper
    bounds are checked when ``image_size`` (width, height) of the board ``image`` is given."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not text ({e.reason})"
        raise DatasetError(f"cannot read annotation file {path}: {why}",
                           fix="check the path in the list file") from None
    defects = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 5:
            raise DatasetError(f"{path}:{lineno}: expected 'x1 y1 x2 y2 type', got {line!r}",
                               fix="fix or remove the line, or pass skip_bad=True to skip the file")
        defects.append(_defect_from_line(path, lineno, line, parts, image_size, image))
    return tuple(defects)


def _defect_from_line(path, lineno: int, line: str, parts: list[str],
                      image_size: tuple[int, int] | None, image: Path | None) -> Defect:
    try:
        values = [float(p) for p in parts]
        x1, y1, x2, y2, t = (int(v) for v in values)
    except (ValueError, OverflowError):
        raise DatasetError(f"{path}:{lineno}: not numbers: {line!r}",
                           fix="fix or remove the line") from None
    if t not in DEEPPCB_TYPE_IDS or not values[4].is_integer():
        raise DatasetError(f"{path}:{lineno}: unknown defect type id {parts[4]}",
                           fix="DeepPCB types are 1..6: " + ", ".join(
                               f"{k}={v}" for k, v in DEEPPCB_TYPE_IDS.items()))
    box = f"({x1}, {y1}, {x2}, {y2})"
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{path}:{lineno}: empty box {box}: "
                           + ("x2 <= x1" if x2 <= x1 else "y2 <= y1"),
                           fix="a box is 'x1 y1 x2 y2 type' with x2 > x1 and y2 > y1; fix or "
                               "remove the line")
    w, h = image_size if image_size is not None else (None, None)
    if x1 < 0 or y1 < 0 or (w is not None and (x2 > w or y2 > h)):
        size = f"the {w}x{h} image {image}" if w is not None else "the image (negative corner)"
        raise DatasetError(f"{path}:{lineno}: box {box} lies outside {size}",
                           fix=f"boxes are pixel corners with 0 <= x1 < x2 <= "
                               f"{w if w is not None else 'width'} and 0 <= y1 < y2 <= "
                               f"{h if h is not None else 'height'}; fix the line, or check "
                               "that the list pairs it with the right image")
    return Defect(DEEPPCB_TYPE_IDS[t], (float(x1), float(y1), float(x2), float(y2)))


def read_list(root: str | Path, list_file: str | Path = "trainval.txt", *,
              skip_bad: bool = False) -> list[Board]:
    """Read a DeepPCB list file (`groupG/N/ID.jpg groupG/N_not/ID.txt` a line) under ``root``.

    Every line is checked before this returns: its two images exist, their headers give one
    size, and every annotation box lies inside it. With ``skip_bad`` a board that fails a check
    is logged (as a warning naming the file and the reason) and left out; without it, it raises.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist",
                           fix="pass --data DIR pointing at a DeepPCB-layout folder")
    lf = Path(list_file)
    if not lf.is_absolute() and (root / lf).is_file():
        lf = root / lf  # a list file under the data root wins over one in the cwd
    if not lf.is_file():
        raise DatasetError(f"list file {lf} not found",
                           fix="DeepPCB folders hold trainval.txt; pass --list FILE otherwise")
    try:
        text = lf.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"list file {lf} cannot be read: {e}",
                           fix="a list file is UTF-8 text, one 'IMAGE ANNOTATION' pair a line"
                           ) from None
    boards: list[Board] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            boards.append(_board_from_line(root, line, lf, lineno))
        except (DatasetError, InputImageError) as e:
            if not skip_bad:
                raise
            log.warning("skipping %s:%d: %s", lf, lineno, e)
    if not boards:
        raise DatasetError(f"list file {lf} names no readable board", fix="check the file")
    return boards


def _board_from_line(root: Path, line: str, lf: Path, lineno: int) -> Board:
    parts = line.split()
    if len(parts) != 2:
        raise DatasetError(f"{lf}:{lineno}: expected 'IMAGE ANNOTATION', got {line!r}",
                           fix="each line is 'groupG/N/ID.jpg groupG/N_not/ID.txt'")
    img_rel, ann_rel = parts
    img = root / img_rel
    stem = img.with_suffix("")
    test, temp = Path(f"{stem}_test.jpg"), Path(f"{stem}_temp.jpg")
    for p in (test, temp):
        if not p.is_file():
            raise DatasetError(f"{lf}:{lineno}: image {p} not found", fix="check the data folder")
    size = _image_size(test, lf, lineno)
    temp_size = _image_size(temp, lf, lineno)
    if temp_size != size:
        raise InputImageError(f"{lf}:{lineno}: template {temp} is {temp_size[0]}x{temp_size[1]}, "
                              f"board {test} is {size[0]}x{size[1]}",
                              fix="a board and its template are aligned images of one size")
    ann = root / ann_rel
    group = Path(img_rel).parts[0]
    return Board(id=stem.name, group=group, test_path=test, template_path=temp,
                 defects=parse_annotation(ann, size, test), annotation_path=ann,
                 list_line=lineno)


def _image_size(path: Path, lf: Path, lineno: int) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputImageError(f"{lf}:{lineno}: image {path} cannot be read "
                              f"({type(e).__name__}: {e})",
                              fix="the file is corrupt or not an image; replace it or remove "
                                  "the line") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def split_trainval(boards: list[Board]) -> tuple[list[Board], list[Board]]:
    """The project's fixed split: per group, the last 20% of ids (sorted) go to validation."""
    by_group: dict[str, list[Board]] = {}
    for b in boards:
        by_group.setdefault(b.group, []).append(b)
    train, val = [], []
    for g in sorted(by_group):
        bs = sorted(by_group[g], key=lambda b: b.id)
        n_val = max(1, round(len(bs) * VAL_FRACTION)) if len(bs) > 1 else 0
        train += bs[: len(bs) - n_val]
        val += bs[len(bs) - n_val:]
    return train, val


# The design split (issue 17): whole board groups (panel designs) the model never trains on.
# Two of DeepPCB trainval's seven designs, 211 of its 1,000 boards; docs/data.md says why these.
HELD_OUT_GROUPS = ("group77000", "group92000")


def split_designs(boards: list[Board], held_out: tuple[str, ...] = HELD_OUT_GROUPS
                  ) -> tuple[list[Board], list[Board], list[Board]]:
    """(train, seen-design validation, unseen-design validation): every board of a ``held_out``
    group is unseen-design validation; the other groups are split as ``split_trainval``."""
    seen = [b for b in boards if b.group not in held_out]
    unseen = sorted((b for b in boards if b.group in held_out), key=lambda b: (b.group, b.id))
    train, seen_val = split_trainval(seen)
    return train, seen_val, unseen


def find_data_root(data: str | Path | None) -> Path:
    """``data`` if given, else the embedded sample shipped inside the package."""
    if data is not None:
        return Path(data)
    return Path(__file__).resolve().parent / "sample"
