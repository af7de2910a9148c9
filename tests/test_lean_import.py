"""`pcbedge --help` and `pcbedge targets` must not import the heavy libraries (STYLE.md, 6).

Runs in a fresh interpreter, since this test session may already have imported torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "tensorrt", "onnxscript")

PROBE = f"""
import sys
from unittest import mock
import pcbedge.cli

for argv in (["pcbedge", "--help"], ["pcbedge", "--version"], ["pcbedge", "targets"]):
    with mock.patch.object(sys, "argv", argv):
        try:
            pcbedge.cli.main()
        except SystemExit as e:
            assert e.code in (0, None), (argv, e.code)
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_and_targets_do_not_import_heavy_libraries():
    proc = _python("-c", PROBE)
    assert proc.returncode == 0, proc.stderr
    assert "x86-cpu" in proc.stdout  # the targets table really ran
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY:", proc.stdout


def test_python_dash_m_pcbedge_runs():
    proc = _python("-m", "pcbedge", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "targets" in proc.stdout
