"""What pcbedge may write, and what a failed write means to the user.

* :func:`check_output`: ``--out`` never is, contains or lies inside one of the command's inputs
  (symlinks resolved), and a non-empty folder is replaced only when pcbedge made it (a bundle
  with pcbedge's manifest, a bench report folder, or only pcbedge's own temporaries), and only
  with ``overwrite``: a home folder or a dataset is refused even with ``--overwrite``.
* :func:`output_error` / :func:`write_failure`: a full disk, an exhausted quota, a read-only
  file system or a missing permission becomes :class:`~pcbedge.errors.OutputError` naming the
  output and, for a full disk, the space needed and free, wherever the library that hit it
  re-wrapped the OSError.
* :func:`dumps_json`: JSON as the standard has it (no NaN or Infinity), for every JSON write.

Torch-free; used by :mod:`pcbedge.bundle.atomic`, the bench and the CLI.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping

from pcbedge.errors import OutputError, PcbEdgeError

# errno of a write the user must fix on the output side (EDQUOT is missing on some platforms)
OUTPUT_ERRNOS = frozenset(code for code in (
    errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM)
    if code is not None)
_SPACE_ERRNOS = frozenset(c for c in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if c)
# the strerror texts, for libraries (onnxruntime, protobuf) that keep only an OSError's message
_TEXTS = {code: os.strerror(code) for code in OUTPUT_ERRNOS}
# a temporary file of atomic_path: "." + name + "." + mkstemp's 8 random characters + suffix
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|partial)$")
BENCH_REPORT = "report.json"


# --- where an output may go ---------------------------------------------------------------------

def check_output(out_dir: str | Path, *, overwrite: bool,
                 inputs: Mapping[str, str | Path | None] | None = None,
                 kind: str = "bundle") -> None:
    """Refuse an output folder that overlaps an input or that pcbedge may not replace.

    ``inputs`` maps what each input is ("export", "calibration folder") to its path (None: not
    given). ``kind``: "bundle" (export, build) or "bench" (a bench report folder)."""
    check_outside_inputs(out_dir, inputs or {})
    check_destination(out_dir, overwrite, kind=kind)


def check_outside_inputs(out: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """OutputError when ``out`` is, contains or lies inside one of ``inputs`` (after resolving
    symlinks): writing there would overwrite or delete the input (``build --calibration D
    --out D --overwrite`` once deleted the calibration set)."""
    real = Path(out).absolute().resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        src = Path(path).absolute().resolve()
        if real == src:
            how = "is"
        elif real.is_relative_to(src):
            how = "lies inside"
        elif src.is_relative_to(real):
            how = "contains"
        else:
            continue
        aliased = how == "is" and Path(out).absolute() != Path(path).absolute()
        alias = f" (both are {src})" if aliased else ""
        fix = {"is": "pass another output path: pcbedge never replaces one of its inputs",
               "lies inside": f"pass an output outside {path}: pcbedge never writes into one "
                              "of its inputs",
               "contains": f"pass an output that does not hold {path}: replacing it would "
                           "delete that input"}[how]
        raise OutputError(f"output {out} {how} the {what} {path}{alias}: writing there would "
                          f"change or delete the {what}", fix=fix)


def check_destination(out_dir: str | Path, overwrite: bool, *, kind: str = "bundle") -> None:
    """Refuse a file, a non-empty folder that pcbedge did not make (whatever ``overwrite``
    says: ``--overwrite`` on a home folder must not delete it), and a folder pcbedge made
    unless ``overwrite``. Nothing is deleted here."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a folder",
                          fix="pass another output folder")
    if not out_dir.is_dir():
        return
    try:
        entries = sorted(p.name for p in out_dir.iterdir())
    except OSError as e:
        raise output_error(e, out_dir) from None
    if not entries:
        return
    made = made_by_pcbedge(out_dir, kind)
    if made is None:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3
                                          else "")
        what = "bench report folder" if kind == "bench" else "bundle"
        raise OutputError(f"output folder {out_dir} is not empty ({shown}) and is not a {what} "
                          "made by pcbedge: it is never replaced, not even with --overwrite",
                          fix="choose a new or empty folder for the output (--overwrite "
                              f"replaces only a {what} pcbedge made)")
    if not overwrite:
        raise OutputError(f"output folder {out_dir} is not empty: it holds {made}",
                          fix="pass overwrite=True (--overwrite) to replace it atomically, "
                              "or choose another folder")


def made_by_pcbedge(folder: Path, kind: str = "bundle") -> str | None:
    """What pcbedge output ``folder`` holds ("a pcbedge bundle", ...), or None when pcbedge did
    not make it. A bundle: a manifest.json (or the manifest.json.partial of a publish killed
    before its last rename) of pcbedge's kind and schema; a bench folder: pcbedge's
    report.json (or the junit.xml of a refused run). Only temporaries of pcbedge's atomic
    writer (a killed write) count as pcbedge's too."""
    from pcbedge.bundle.manifest import KIND, MANIFEST, PARTIAL_SUFFIX
    if kind == "bundle":
        for name, what in ((MANIFEST, "a pcbedge bundle"),
                           (MANIFEST + PARTIAL_SUFFIX, "an interrupted pcbedge bundle")):
            doc = _read_json(folder / name)
            if (isinstance(doc, dict) and doc.get("kind") == KIND
                    and _is_int(doc.get("schema_version"))):
                return what
    elif kind == "bench":
        doc = _read_json(folder / BENCH_REPORT)
        if (isinstance(doc, dict) and _is_int(doc.get("schema_version"))
                and str(doc.get("title", "")).startswith("pcbedge bench")):
            return "a pcbedge bench report"
        if b'name="pcbedge.bench' in _head(folder / "junit.xml"):
            return "the junit.xml of a pcbedge bench"
        if is_answer_cache_folder(folder):
            return "the answers of an interrupted pcbedge bench --resume"
    else:
        raise ValueError(f"unknown output kind {kind!r}")
    names = [p.name for p in folder.iterdir()]
    if names and all(_TEMP_FILE.match(n) for n in names):
        return "only temporary files of an interrupted pcbedge write"
    return None


ANSWER_CACHE_FOLDER = "answers"              # bench --resume (pcbedge.benchmarks.answer_cache)
ANSWER_CACHE_HEADER = {"pcbedge_answer_cache": 1}


def is_answer_cache_folder(folder: Path) -> bool:
    """True when ``folder/answers`` holds only pcbedge answer caches (an interrupted
    ``bench --resume`` whose report.json was not written yet)."""
    sub = Path(folder) / ANSWER_CACHE_FOLDER
    try:
        files = list(sub.iterdir())
    except OSError:
        return False
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                if json.loads(fh.readline()) != ANSWER_CACHE_HEADER:
                    return False
        except (OSError, UnicodeDecodeError, ValueError):
            return False
    return bool(files)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_json(path: Path):
    try:
        if path.stat().st_size > 64 << 20:   # not a manifest or a report
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


# --- failed writes ------------------------------------------------------------------------------

def write_failure(exc: BaseException, within: tuple[Path, ...] = ()) -> OSError | None:
    """The output-side disk failure behind ``exc``, or None.

    An OSError with an errno of OUTPUT_ERRNOS, found in ``exc`` or the exceptions it was
    raised from or while handling (the quantizer and the exporter re-wrap them, pcbedge's own
    handlers once re-typed them as ExportError or CalibrationError), or named by the message of
    a library exception that kept only the text. A permission error counts only for a file
    inside ``within`` (or with no file named): the same EACCES reading an input is not an
    output problem."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            if e.errno in OUTPUT_ERRNOS and _on_output_side(e, within):
                return e
        elif not isinstance(e, PcbEdgeError):
            text = str(e)
            for code, words in _TEXTS.items():
                if words in text:
                    return OSError(code, words)
        e = e.__cause__ if e.__cause__ is not None else e.__context__
    return None


def raise_write_failure(exc: Exception, within: tuple[Path, ...] = ()) -> None:
    """Raise the OSError of :func:`write_failure` (a fresh one, chained to ``exc``) when there
    is one; return otherwise. For handlers that re-type a library's errors: a full disk must
    reach the writer, which names the output, not become "quantizing failed"."""
    failure = write_failure(exc, within)
    if failure is None:
        return
    if failure is exc:
        raise exc
    raise OSError(failure.errno, failure.strerror, failure.filename) from exc


def _on_output_side(e: OSError, within: tuple[Path, ...]) -> bool:
    if e.errno in _SPACE_ERRNOS or not within or not e.filename:
        return True
    try:
        name = Path(os.fsdecode(e.filename)).absolute().resolve()
    except (TypeError, ValueError, OSError):
        return True
    return any(name.is_relative_to(Path(w).absolute().resolve()) for w in within)


def output_error(e: OSError, path: str | Path, *, needed: int | None = None) -> OutputError:
    """The OutputError of the OSError ``e`` hit while writing ``path``: it names the path, the
    reason and, for a full disk or quota, the space needed (``needed`` bytes, where known) and
    the space free on that disk."""
    path = Path(path)
    code = e.errno
    if code in _SPACE_ERRNOS:
        free = free_bytes(path)
        need = f"it needs about {format_bytes(needed)}, " if needed else ""
        have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
        what = "no space left on the disk" if code == errno.ENOSPC else "disk quota exceeded"
        fix = (f"free at least {format_bytes(needed)} on that disk" if needed
               else "free space on that disk") + ", or write the output to another disk"
        return OutputError(f"cannot write {path}: {what} ({need}{have})", fix=fix)
    if code == errno.EROFS:
        return OutputError(f"cannot write {path}: the file system is read-only",
                           fix="write the output to a folder on a writable disk")
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {path}: permission denied ({e.strerror or e})",
                           fix="write the output to a folder you may write to, or change the "
                               "folder's permissions")
    return OutputError(f"cannot write {path}: {e.strerror or e}",
                       fix="check the free space and permissions of its folder")


def free_bytes(path: Path) -> int | None:
    """Free bytes on the disk of ``path`` (its nearest existing folder), or None."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def format_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# --- JSON ---------------------------------------------------------------------------------------

def finite_json(obj, default: Callable | None = None):
    """``obj`` with every NaN and Infinity as None (JSON has no such numbers: ``json.dumps``
    would write the invalid tokens ``NaN``/``Infinity``); ``default`` converts other objects
    (numpy arrays and scalars: their ``tolist()``) first."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, dict):
        return {k: finite_json(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, default) for v in obj]
    if hasattr(obj, "tolist"):
        return finite_json(obj.tolist(), default)
    if default is not None:
        return finite_json(default(obj), default)
    return obj   # json.dumps raises its TypeError


def dumps_json(obj, *, default: Callable | None = None, **kwargs) -> str:
    """``json.dumps`` that never writes NaN or Infinity (see :func:`finite_json`)."""
    return json.dumps(finite_json(obj, default), allow_nan=False, **kwargs)
