"""The bad-input catalogue's harness: a case is a CLI call (:class:`Call`) made by a function of
the test environment (:class:`Env`), registered with :func:`case` under the error it must raise.
Case modules (``cases_*.py`` beside this file) register cases on import; tests/test_bad_inputs.py
runs them all and checks docs/bad-inputs.md lists each one."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from click.testing import CliRunner

from pcbedge.cli import cli
from pcbedge.errors import ALL_ERRORS
from pcbedge.testing import write_pair_images

REPO = Path(__file__).resolve().parents[2]
SAMPLE_JPG = REPO / "pcbedge/data/sample/group00041/00041/00041000_test.jpg"
DOC = REPO / "docs" / "bad-inputs.md"
EXIT_CODES = {e.__name__: e.exit_code for e in ALL_ERRORS} | {"UsageError": 2, "(none)": 0}
INTENTS = ("where", "count", "exists", "describe", "verdict", "unsupported")
Q = "where are the shorts?"


@dataclass
class Env:
    tmp: Path
    model: Path
    export: Path
    built: Path
    defer: Callable

    def pair(self, size=(200, 150)) -> tuple[Path, Path]:
        return write_pair_images(self.tmp / "pair", size=size)

    def bundle_copy(self, src: Path | None = None) -> Path:
        return Path(shutil.copytree(src or self.export, self.tmp / "bundle"))


# --- the catalogue ------------------------------------------------------------------------------

@dataclass
class Call:
    argv: list
    names: tuple[str, ...]                  # fragments the message must contain
    absent: tuple[Path, ...] = ()           # outputs that must not exist afterwards
    unchanged: Path | None = None           # a folder whose contents must stay as they were
    subprocess: bool = False


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Env], Call]
    error: str
    xfail: str | None = None


CASES: dict[str, Case] = {}


def case(cid: str, error: str, make: Callable[[Env], Call] | None = None, *,
         xfail: str | None = None):
    """Register a case: ``case(id, error, make)``, or as a decorator of ``make``."""
    def deco(fn):
        assert cid not in CASES, cid
        CASES[cid] = Case(cid, fn, error, xfail)
        return fn
    return deco(make) if make is not None else deco


def ask(env: Env, image, template, question=Q, *extra, bundle=None) -> list:
    return ["ask", str(bundle or env.export), "--image", str(image), "--template",
            str(template), *extra, question]


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (8-bit gray) with almost no pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


# --- running a case -----------------------------------------------------------------------------

def invoke(call: Call, cwd: Path) -> tuple[int, str]:
    if call.subprocess:
        argv = [a if isinstance(a, bytes) else str(a) for a in call.argv]
        proc = subprocess.run([sys.executable, "-m", "pcbedge", *argv], cwd=cwd,
                              capture_output=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")
    result = CliRunner().invoke(cli, [str(a) for a in call.argv])
    # an unexpected exception is caught by CliRunner (exit 1, no text): report it as a failure
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"crashed: {result.exception!r}\n{result.output}"
    return result.exit_code, result.output


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def leftovers(path: Path) -> list[Path]:
    """Staging folders and temporary files an interrupted or failed write could leave."""
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir()
            if p.name.startswith(f".{path.name}.") or p.name.startswith(f".{path.name}-")]


