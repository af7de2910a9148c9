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

from pcbedge.errors import DatasetError

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


def parse_annotation(path: Path) -> tuple[Defect, ...]:
    """Parse one DeepPCB annotation file; a bad line is a DatasetError naming file and line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {path}: {e.strerror}",
                           fix="check the path in the list file") from None
    defects = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 5:
            raise DatasetError(f"{path}:{lineno}: expected 'x1 y1 x2 y2 type', got {line!r}",
                               fix="fix or remove the line, or pass skip_bad=True to skip the file")
        try:
            x1, y1, x2, y2, t = (int(float(p)) for p in parts)
        except (ValueError, OverflowError):
            raise DatasetError(f"{path}:{lineno}: not numbers: {line!r}",
                               fix="fix or remove the line") from None
        if t not in DEEPPCB_TYPE_IDS:
            raise DatasetError(f"{path}:{lineno}: unknown defect type id {t}",
                               fix="DeepPCB types are 1..6: " + ", ".join(
                                   f"{k}={v}" for k, v in DEEPPCB_TYPE_IDS.items()))
        if x2 <= x1 or y2 <= y1:
            raise DatasetError(f"{path}:{lineno}: empty box {line!r}", fix="x2 > x1 and y2 > y1")
        defects.append(Defect(DEEPPCB_TYPE_IDS[t], (float(x1), float(y1), float(x2), float(y2))))
    return tuple(defects)


def read_list(root: str | Path, list_file: str | Path = "trainval.txt", *,
              skip_bad: bool = False) -> list[Board]:
    """Read a DeepPCB list file (`groupG/N/ID.jpg groupG/N_not/ID.txt` a line) under ``root``.

    With ``skip_bad`` a board whose files are missing or whose annotation does not parse is logged
    (as a warning naming the file and the reason) and left out; without it, it raises.
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
                           fix=f"DeepPCB folders hold trainval.txt; pass --list FILE otherwise")
    boards: list[Board] = []
    for lineno, line in enumerate(lf.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            boards.append(_board_from_line(root, line, lf, lineno))
        except DatasetError as e:
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
    ann = root / ann_rel
    group = Path(img_rel).parts[0]
    return Board(id=stem.name, group=group, test_path=test, template_path=temp,
                 defects=parse_annotation(ann), annotation_path=ann)


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


def find_data_root(data: str | Path | None) -> Path:
    """``data`` if given, else the embedded sample shipped inside the package."""
    if data is not None:
        return Path(data)
    return Path(__file__).resolve().parent / "sample"
