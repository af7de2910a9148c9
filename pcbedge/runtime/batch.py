"""``pcbedge ask BUNDLE --batch IN.jsonl --out OUT.jsonl``: the batch file, checked whole before
any line is answered, and the answers, written atomically.

A batch line is ``{"id", "image", "template", "question"}``; relative image paths are relative to
the batch file's folder. Every problem a line can have is found before the model is loaded (a
bad last line must not cost the answers before it): strict JSON (no ``NaN``/``Infinity``), the
four keys, string paths and question, an id that is a string or a finite number and unique,
readable images (read once, by the runner's reader), and an ``--out`` that is none of the
inputs. Torch-free.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

from pcbedge.errors import DatasetError, OutputError, PcbEdgeError

BATCH_KEYS = ("id", "image", "template", "question")


def read_batch(path: Path, out: Path | None = None) -> list[tuple[int, dict]]:
    """Parse and check every line of the batch JSONL ``path``: [(line number, item)], the
    item's image and template as paths. ``out``: the answers file, checked against the
    inputs."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"batch file {path} cannot be read: {e}",
                           fix="pass a UTF-8 JSONL file") from None
    items, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = parse_line(path, n, line)
        key = json.dumps(item["id"])
        if key in seen:
            raise DatasetError(f"{path} line {n}: id {item['id']!r} repeats line {seen[key]}",
                               fix="give every line its own id")
        seen[key] = n
        items.append((n, {**item, "image": path.parent / item["image"],
                          "template": path.parent / item["template"]}))
    if not items:
        raise DatasetError(f"batch file {path} has no questions", fix="add JSONL lines")
    if out is not None:
        check_out(Path(out), path, items)
    check_images(path, items)
    return items


def parse_line(path: Path, n: int, line: str) -> dict:
    """One batch line as a dict, or a DatasetError naming the file, the line and the value."""
    def no_constant(name: str):
        raise DatasetError(f"{path} line {n}: {name} is not valid JSON (JSON has no NaN or "
                           "Infinity)", fix="write a string or a finite number instead")
    try:
        item = json.loads(line, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} line {n}: not valid JSON ({e.msg})",
                           fix=f"one object a line with keys {', '.join(BATCH_KEYS)}") from None
    missing = [k for k in BATCH_KEYS if k not in item] if isinstance(item, dict) else BATCH_KEYS
    if missing:
        raise DatasetError(f"{path} line {n}: missing {', '.join(missing)}",
                           fix=f"each line is an object with keys {', '.join(BATCH_KEYS)}")
    for key in ("image", "template", "question"):
        if not isinstance(item[key], str):
            raise DatasetError(f"{path} line {n}: {key!r} = {item[key]!r} is not a string",
                               fix=f"give {key!r} as a JSON string")
    ident = item["id"]
    finite_number = (isinstance(ident, (int, float)) and not isinstance(ident, bool)
                     and math.isfinite(ident))   # 1e999 parses as inf
    if not (isinstance(ident, str) or finite_number):
        raise DatasetError(f"{path} line {n}: id {ident!r} is not a string or a finite number",
                           fix='give every line an id such as 7 or "board-7"')
    return item


def check_out(out: Path, batch: Path, items: list[tuple[int, dict]]) -> None:
    """``out`` is a file that is neither the batch file nor one of its images (symlinks
    resolved): the atomic rename would replace the input with the answers."""
    from pcbedge.bundle.outputs import check_outside_inputs
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; the answers are one JSONL file",
                          fix="pass a file path such as answers.jsonl")
    check_outside_inputs(out, {"batch file": batch})
    real = out.absolute().resolve()
    for n, item in items:
        for key in ("image", "template"):
            if item[key].absolute().resolve() == real:
                raise OutputError(f"--out {out} is the {key} of {batch} line {n}: the answers "
                                  "would replace it", fix="write the answers to another file")


def check_images(batch: Path, items: list[tuple[int, dict]]) -> None:
    """Read every image once, as the runner will (missing, empty, truncated, oversized and
    undecodable files are refused), naming the line and id. The pixels are not kept."""
    from pcbedge.data.preprocess import read_gray
    checked: set[Path] = set()
    for n, item in items:
        for key in ("image", "template"):
            if item[key] in checked:
                continue
            try:
                read_gray(item[key])
            except PcbEdgeError as e:
                raise at_line(e, batch, n, item["id"]) from None
            checked.add(item[key])


def at_line(e: PcbEdgeError, batch: Path, n: int, ident) -> PcbEdgeError:
    """``e`` again, its message prefixed with the batch file, line and id."""
    msg = str(e).split("\n  fix: ")[0]
    return type(e)(f"{batch} line {n} (id {ident!r}): {msg}", fix=e.fix)


def run_batch(runner, items: list[tuple[int, dict]], batch: Path, out: Path, kw: dict,
              default: Callable | None = None) -> None:
    """Answer every item into ``out``, one JSON line each (atomic: all the answers or no file).
    A float an answer holds that JSON cannot (NaN, Infinity) is written as null."""
    from tqdm import tqdm

    from pcbedge.bundle.atomic import atomic_path
    from pcbedge.bundle.outputs import dumps_json
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for n, item in tqdm(items, desc="ask", unit="q", file=sys.stderr, disable=None):
            try:
                ans = runner.ask(item["image"], item["template"], item["question"], **kw)
            except PcbEdgeError as e:
                raise at_line(e, batch, n, item["id"]) from None
            f.write(dumps_json({"id": item["id"], **ans}, default=default) + "\n")
        f.flush()
        os.fsync(f.fileno())   # a full disk shows here, before the rename
