"""Atomic writes: an artifact is staged in a temporary path and renamed into place.

A bundle folder is published in two renames, and the manifest is the very last name to appear:

1. everything, the manifest included, is written into a hidden staging folder next to the
   destination, the manifest under the name ``manifest.json.partial``;
2. the staging folder is renamed to the destination (an existing destination is moved aside
   first and deleted afterwards when ``overwrite=True``);
3. ``manifest.json.partial`` is renamed to ``manifest.json`` inside the destination.

So a process killed at any point leaves either nothing, a hidden staging folder without a
manifest, a destination without a manifest (which every reader refuses as incomplete), or the
complete bundle: never a half-written folder that looks complete. Torch-free.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from pcbedge.errors import OutputError

PARTIAL_SUFFIX = ".partial"
_STAGING_TAG = ".staging-"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` (the user's umask, not mkstemp's 0600: outputs are
    shared like any file the user makes), renamed onto ``path`` only if the block succeeds and
    removed otherwise. OSError (no space, read-only, no permission) -> OutputError naming the
    path. The one file writer of pcbedge: bundles, reports, answers, drawings."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}",
                          fix="choose a writable folder with free space") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}",
                          fix="check the free space and permissions of its folder") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}{_STAGING_TAG}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out_dir: Path) -> list[Path]:
    """Remove staging folders of ``out_dir`` left by killed processes (their pid is gone)."""
    removed = []
    parent, prefix = out_dir.parent, _staging_prefix(out_dir)
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if not (p.is_dir() and p.name.startswith(prefix)):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse a destination that exists and is not empty, unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a folder",
                          fix="pass another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        what = ("a bundle" if (out_dir / "manifest.json").is_file()
                else "files but no manifest.json (an interrupted export?)")
        raise OutputError(f"output folder {out_dir} is not empty: it holds {what}",
                          fix="pass overwrite=True (--overwrite) to replace it atomically, "
                              "or choose another folder")


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on a clean exit publish it as ``out_dir`` (see module doc).

    On any exception the staging folder is deleted and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir).absolute()
    check_destination(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(out_dir)
        stage = out_dir.parent / f"{_staging_prefix(out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write into {out_dir.parent}: {e.strerror or e}",
                          fix="choose a writable folder with free space") from None
    try:
        yield stage
        publish(stage, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish(stage: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename a finished staging folder into place, then reveal its manifest (last rename)."""
    check_destination(out_dir, overwrite)
    old = None
    try:
        if out_dir.exists():
            tag = f"{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            old = out_dir.parent / f"{_staging_prefix(out_dir)}{tag}"
            os.rename(out_dir, old)
        os.rename(stage, out_dir)
    except OSError as e:
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise OutputError(f"cannot move the finished export into {out_dir}: {e.strerror or e}",
                          fix="check permissions and free space of the output folder") from None
    for partial in out_dir.glob(f"*{PARTIAL_SUFFIX}"):
        os.replace(partial, partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)]))
    _fsync_dir(out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
