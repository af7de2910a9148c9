"""Atomic writes: an artifact is staged in a temporary path and renamed into place.

A bundle folder is published in two renames, and the manifest is the very last name to appear:

1. everything, the manifest included, is written into a hidden staging folder next to the
   destination, the manifest under the name ``manifest.json.partial``;
2. the staging folder is renamed to the destination (an existing destination is moved aside
   first and deleted afterwards when ``overwrite=True``);
3. ``manifest.json.partial`` is renamed to ``manifest.json`` inside the destination.

So a process killed at any point leaves either nothing, a hidden staging folder without a
manifest, a destination without a manifest (which every reader refuses as incomplete), or the
complete bundle: never a half-written folder that looks complete. The renames run with SIGINT
and SIGTERM held back, so an interrupt lands before or after them, never between.

Before anything is written (or deleted) the destination is checked
(:func:`pcbedge.bundle.outputs.check_output`): ``--out`` never overlaps an input, and
``overwrite`` replaces only what pcbedge made. A failed write (full disk, read-only, no
permission) is an OutputError naming the destination. Torch-free.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from pcbedge.bundle.outputs import (check_destination, check_output, dumps_json, output_error,
                                    tree_bytes, write_failure)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "staged_dir", "publish", "clean_stale_staging", "check_destination", "check_output"]

PARTIAL_SUFFIX = ".partial"
_STAGING_TAG = ".staging-"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", *,
                needed: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` (the user's umask, not mkstemp's 0600: outputs are
    shared like any file the user makes), renamed onto ``path`` only if the block succeeds and
    removed otherwise. OSError (no space, read-only, no permission), raised here or by the
    block, -> OutputError naming ``path`` (and ``needed`` bytes, when known, for a full disk).
    The one file writer of pcbedge: bundles, reports, answers, drawings."""
    path = Path(path)
    tmp = None
    try:   # one try from the temporary's creation on: a signal can land between any two lines
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise output_error(exc, path, needed=needed) from exc
        failure = (write_failure(exc, within=(Path(tmp),))   # not an input's EACCES
                   if isinstance(exc, Exception) and tmp is not None else None)
        if failure is not None:
            raise output_error(failure, path, needed=needed) from exc
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    with atomic_path(path, needed=len(data)) as tmp, open(tmp, "wb") as f:
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
    """JSON without NaN or Infinity (written as null: the standard has no such numbers)."""
    atomic_write_text(path, dumps_json(obj, indent=2, sort_keys=False) + "\n")


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
    """Remove staging folders of ``out_dir`` left by killed processes (their pid is gone),
    with whatever they hold (the quantizer's temporaries live inside them too)."""
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


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, *, overwrite: bool = False,
               inputs: Mapping[str, str | Path | None] | None = None,
               needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh staging folder; on a clean exit publish it as ``out_dir`` (see module doc).

    ``out_dir`` is checked first (:func:`~pcbedge.bundle.outputs.check_output` against
    ``inputs``; a symlink is followed, so the folder it points to is replaced and the link
    kept). On any exception the staging folder is deleted and ``out_dir`` is left as it was; a
    disk failure anywhere in the block, however re-wrapped, becomes an OutputError naming
    ``out_dir`` and, for a full disk, the space needed (``needed`` bytes, or what was staged).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()
    check_output(out_dir, overwrite=overwrite, inputs=inputs)
    stage = out_dir.parent / f"{_staging_prefix(out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:   # one try from the stage's creation on: a signal can land between any two lines
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_staging(out_dir)
            stage.mkdir()
        except OSError as e:
            raise output_error(e, out_dir.parent, needed=needed) from e
        yield stage
        with _signals_held():
            publish(stage, out_dir, overwrite=overwrite)
    except BaseException as exc:
        staged = tree_bytes(stage)
        shutil.rmtree(stage, ignore_errors=True)
        failure = (write_failure(exc, within=(stage, out_dir))
                   if isinstance(exc, Exception) else None)
        if failure is not None:
            raise output_error(failure, out_dir, needed=max(needed or 0, staged) or None) from exc
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
        raise output_error(e, out_dir) from e
    for partial in out_dir.glob(f"*{PARTIAL_SUFFIX}"):
        os.replace(partial, partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)]))
    _fsync_dir(out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done, then act as they would have: an
    interrupt between moving the old bundle aside and renaming the new one into place would
    leave neither at ``out_dir``. (The main thread only: Python runs signal handlers there.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        saved[sig] = signal.getsignal(sig)
        if saved[sig] not in (signal.SIG_IGN, None):
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            handler = saved[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
