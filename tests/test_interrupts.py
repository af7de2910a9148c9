"""Interrupt safety: ``pcbedge export`` and ``pcbedge build`` killed (SIGKILL) at random moments.

Each command is run once to completion to measure its duration, then started again and killed
at seeded random moments spread over that duration. Afterwards the output folder is either
absent or complete and valid (manifest.json present, every file's sha256 verified). Anything
else beside it must be a hidden staging folder, which the next run cleans up.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcbedge.bundle.manifest import read_manifest, verify_files

REPO = Path(__file__).resolve().parents[1]
SEED = 1122
KILLS = 3
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def pcbedge(*args) -> list[str]:
    return [sys.executable, "-m", "pcbedge", *map(str, args)]


def run_to_completion(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - t0


def kill_after(argv: list[str], cwd: Path, seconds: float) -> int | None:
    """Start ``argv``, SIGKILL it (its own process group) after ``seconds``; its exit code if it
    finished first, else None."""
    proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def moments(duration: float, rng: random.Random) -> list[float]:
    """KILLS moments, one in each equal slice of [10%, 100%] of the measured duration."""
    lo, span = 0.1 * duration, 0.9 * duration / KILLS
    return [lo + span * (i + rng.random()) for i in range(KILLS)]


def check_output(out: Path) -> str:
    """'absent' or 'complete'; fails on a visible, half-written output."""
    hidden = [p for p in out.parent.iterdir() if p != out]
    for p in hidden:
        assert p.name.startswith(f".{out.name}.staging-"), f"unexpected leftover {p}"
        assert not (p / "manifest.json").exists(), f"a staging folder looks complete: {p}"
    if not out.exists():
        return "absent"
    assert (out / "manifest.json").is_file(), \
        f"{out} exists without manifest.json: {sorted(q.name for q in out.iterdir())}"
    verify_files(out, read_manifest(out))
    return "complete"


def kill_runs(make_argv, duration: float, root: Path, rng: random.Random) -> list[tuple]:
    results = []
    for i, t in enumerate(moments(duration, rng)):
        out = root / f"kill{i}" / "out"
        out.parent.mkdir(parents=True)
        code = kill_after(make_argv(out), root, t)
        assert code in (None, 0), f"exit {code} before the kill"
        results.append((round(t, 1), "finished" if code == 0 else "killed", check_output(out)))
    print(f"\n{make_argv(Path('OUT'))[3:]}: duration {duration:.1f} s, kills {results}")
    return results


@pytest.fixture(scope="module")
def export_run(tmp_path_factory) -> tuple[Path, Path, float]:
    """(tiny model folder, its export, seconds the export took) from one uninterrupted run."""
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm
    root = tmp_path_factory.mktemp("interrupts")
    model = tiny_pcbvlm(root)
    out = root / "measured" / "export"
    out.parent.mkdir()
    duration = run_to_completion(pcbedge("export", "--model", model, "--out", out, "--no-check"),
                                 root)
    assert check_output(out) == "complete"
    return model, out, duration


@pytest.mark.slow  # about a minute on 2 busy cores: one export plus three killed ones
def test_killed_export_leaves_nothing_or_a_complete_bundle(export_run, tmp_path):
    model, _, duration = export_run
    kill_runs(lambda out: pcbedge("export", "--model", model, "--out", out, "--no-check"),
              duration, tmp_path, random.Random(SEED))


def test_killed_build_leaves_nothing_or_a_complete_bundle(export_run, tmp_path):
    _, export, _ = export_run

    def argv(out: Path) -> list[str]:
        return pcbedge("build", "--target", "x86-cpu", "--export", export, "--out", out,
                       "--overwrite")

    first = tmp_path / "measured" / "out"
    duration = run_to_completion(argv(first), tmp_path)
    assert check_output(first) == "complete"
    kill_runs(argv, duration, tmp_path, random.Random(SEED + 1))
    # a later run over a killed one's folder removes the dead process's staging folder
    again = tmp_path / "kill0" / "out"
    run_to_completion(argv(again), tmp_path)
    assert check_output(again) == "complete"
    assert [p.name for p in again.parent.iterdir()] == ["out"]
