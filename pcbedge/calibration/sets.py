"""Calibration sets: which boards calibrate the INT8 graphs, fixed by a hash.

A set is chosen once (stratified over the six defect types, deterministic under a seed), every
image is decoded up front, and the list plus the files' bytes are hashed, so a bundle's manifest
names exactly the boards its scales came from. Inputs are then produced through
:func:`pcbedge.data.preprocess.load_pair`, the one preprocessing every runtime uses.

Two source layouts:

* a DeepPCB-layout folder: its ``calib.txt`` (or ``trainval.txt``, or ``list_file``);
* a plain folder of ``<name>_test.<ext>`` + ``<name>_temp.<ext>`` pairs (no annotations).
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pcbedge.data.deeppcb import DEFECT_TYPES, read_list
from pcbedge.data.align import align_pair, find_damage
from pcbedge.data.preprocess import read_gray
from pcbedge.errors import CalibrationError, DatasetError, InputImageError

log = logging.getLogger(__name__)

MIN_BOARDS = 8
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
NO_DEFECT = "none"           # stratum of annotated boards without defects
UNLABELLED = "unlabelled"    # stratum of plain-folder pairs


class CalibrationEntry(NamedTuple):
    board_id: str
    test_path: Path
    template_path: Path
    defect_types: tuple[str, ...]


@dataclass(frozen=True)
class CalibrationSet:
    """The boards that calibrate a bundle. ``sha256`` covers the list and every file's bytes."""

    root: Path
    entries: tuple[CalibrationEntry, ...]
    sha256: str
    list_file: str | None = None   # the list the boards were drawn from (None: the default)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def files(self) -> list[str]:
        """Image paths relative to ``root`` (posix), test then template for each board."""
        return [_rel(p, self.root) for e in self.entries for p in (e.test_path, e.template_path)]

    def to_manifest(self) -> dict:
        return {"root": str(self.root), "boards": [e.board_id for e in self.entries],
                "files": self.files, "sha256": self.sha256,
                **({"list_file": self.list_file} if self.list_file else {})}


def select_calibration_set(source: str | Path, n: int = 16, seed: int = 0,
                           list_file: str | Path | None = None, *,
                           min_boards: int = MIN_BOARDS) -> CalibrationSet:
    """Pick ``n`` boards from ``source``, round-robin over defect types, and decode them all.

    Fewer than ``min_boards`` usable boards, or any unreadable image, raises
    :class:`CalibrationError`; nothing is skipped or substituted silently.
    """
    root = Path(source)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder {root} does not exist",
                               fix="pass --calibration DIR: a DeepPCB-layout folder or a folder "
                                   "of <name>_test.jpg + <name>_temp.jpg pairs")
    if n < min_boards:
        raise CalibrationError(f"asked for {n} calibration boards, fewer than the minimum "
                               f"{min_boards}", fix=f"ask for at least {min_boards} boards")
    candidates, annotated = _candidates(root, list_file)
    if len(candidates) < min_boards:
        raise CalibrationError(
            f"calibration folder {root} holds {len(candidates)} board(s), fewer than the "
            f"minimum {min_boards}", fix=f"add boards (at least {min_boards}, {n} recommended) "
                                         "covering every defect type")
    chosen = _stratified(candidates, n, seed, NO_DEFECT if annotated else UNLABELLED)
    if len(chosen) < n:
        log.warning("calibration folder %s holds %d boards; using all of them (asked for %d)",
                    root, len(chosen), n)
    for e in chosen:
        _check_decodes(e)
    entries = tuple(chosen)
    return CalibrationSet(root=root, entries=entries, sha256=hash_entries(root, entries),
                          list_file=str(list_file) if list_file is not None else None)


def select_heldout_set(cal_set: CalibrationSet, n: int, seed: int = 0) -> CalibrationSet:
    """Up to ``n`` boards of the same source that ``cal_set`` does not hold, drawn at random
    (not stratified: they should look like the line's boards) under ``seed``. They measure what
    the quantized graph does on boards its scales were not fitted to (the score bias
    correction of a family whose detection scores need it). May be empty: the caller decides."""
    taken = {e.board_id for e in cal_set.entries}
    cands = sorted((e for e in _candidates(cal_set.root, cal_set.list_file)[0]
                    if e.board_id not in taken), key=lambda e: e.board_id)
    random.Random(seed).shuffle(cands)
    chosen = cands[:max(n, 0)]
    for e in chosen:
        _check_decodes(e)
    entries = tuple(chosen)
    return CalibrationSet(root=cal_set.root, entries=entries,
                          sha256=hash_entries(cal_set.root, entries), list_file=cal_set.list_file)


def hash_entries(root: Path, entries: tuple[CalibrationEntry, ...]) -> str:
    """sha256 over each board's id, defect types, relative paths and the two files' bytes."""
    h = hashlib.sha256()
    for e in entries:
        head = "\t".join([e.board_id, ",".join(e.defect_types),
                          _rel(e.test_path, root), _rel(e.template_path, root)])
        h.update(head.encode() + b"\n")
        for p in (e.test_path, e.template_path):
            data = Path(p).read_bytes()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


# --- sources ------------------------------------------------------------------------------------

def _candidates(root: Path, list_file) -> tuple[list[CalibrationEntry], bool]:
    """The boards of ``root`` and whether they carry annotations (defect types)."""
    if list_file is None:
        for name in ("calib.txt", "trainval.txt"):
            if (root / name).is_file():
                list_file = name
                break
    if list_file is None:
        return _plain_pairs(root), False
    try:
        boards = read_list(root, list_file)
    except (DatasetError, InputImageError) as e:   # read_list reads image headers too
        raise CalibrationError(f"calibration list of {root} cannot be read: {e}",
                               fix="fix the list file or pass a folder of *_test/*_temp pairs"
                               ) from None
    return [CalibrationEntry(b.id, b.test_path, b.template_path,
                             tuple(sorted({d.type for d in b.defects},
                                          key=DEFECT_TYPES.index)))
            for b in boards], True


def _plain_pairs(root: Path) -> list[CalibrationEntry]:
    tests = sorted(p for p in root.rglob("*_test.*") if p.suffix.lower() in IMAGE_EXTS)
    out, missing = [], []
    for t in tests:
        stem = t.name[: -len("_test" + t.suffix)]
        temps = [t.with_name(f"{stem}_temp{ext}") for ext in (t.suffix, *IMAGE_EXTS)]
        temp = next((p for p in temps if p.is_file()), None)
        if temp is None:
            missing.append(t)
            continue
        out.append(CalibrationEntry(_rel(t.with_name(stem), root), t, temp, ()))
    if missing:
        raise CalibrationError(f"{missing[0]} has no template ({missing[0].name.replace('_test', '_temp')})"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                               fix="put each board's golden template beside it as <name>_temp.<ext>")
    return out


def _stratified(cands: list[CalibrationEntry], n: int, seed: int,
                rest: str) -> list[CalibrationEntry]:
    """Round-robin over the strata (the defect types, then ``rest``: boards without a type),
    each shuffled under ``seed``; a board with several types is taken once."""
    rng = random.Random(seed)
    order = [*DEFECT_TYPES, NO_DEFECT, UNLABELLED]
    strata: dict[str, list[CalibrationEntry]] = {k: [] for k in order}
    for e in sorted(cands, key=lambda e: e.board_id):
        for t in e.defect_types or (rest,):
            strata[t].append(e)
    for k in order:
        rng.shuffle(strata[k])
    taken: dict[str, CalibrationEntry] = {}
    while len(taken) < n and any(strata.values()):
        for k in order:
            while strata[k] and strata[k][0].board_id in taken:
                strata[k].pop(0)
            if strata[k] and len(taken) < n:
                e = strata[k].pop(0)
                taken[e.board_id] = e
    return list(taken.values())


def _check_decodes(e: CalibrationEntry) -> None:
    """Both images decode strictly (a damaged or truncated file is refused, naming it), are of
    one size, and show no sign of damaged JPEG data against each other
    (:func:`pcbedge.data.align.find_damage`): a damaged board would move the INT8 scales."""
    arrays = []
    for p in (e.test_path, e.template_path):
        try:
            arrays.append(read_gray(p))
        except InputImageError as err:
            reason = str(err).split("\n  fix:")[0]      # the image's own fix is replaced below
            raise CalibrationError(f"calibration board {e.board_id}: {reason}",
                                   fix=f"replace or remove {p} from the calibration folder"
                                   ) from None
    shapes = [a.shape for a in arrays]
    if shapes[0] != shapes[1]:
        raise CalibrationError(
            f"calibration board {e.board_id}: test {e.test_path} is {shapes[0][1]}x{shapes[0][0]} "
            f"but template {e.template_path} is {shapes[1][1]}x{shapes[1][0]}",
            fix="pair each board with its aligned golden template of the same size")
    test, template, quality = align_pair(*arrays)
    damage = find_damage(test, template, (quality.shift_x, quality.shift_y))
    if damage:
        raise CalibrationError(
            f"calibration board {e.board_id}: {e.test_path} or {e.template_path} looks damaged: "
            f"{damage[0]}",
            fix="replace both files with intact copies, or remove the board from the "
                "calibration folder")


def _rel(p: Path, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(p).as_posix()
