"""The arm64 userland check (scripts/arm64_check.py) on a tiny bundle, when this machine has the
arm64 root prepared (``python scripts/arm64_check.py prepare``, root only). It skips otherwise:
preparing the root downloads a Debian arm64 system and wheels (minutes), which a test must not
do; CI runs it where the root is cached (one board: minutes under qemu, as it emulates the
bundle and its FP32 reference both)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import arm64_check  # noqa: E402

pytestmark = pytest.mark.arm64


def _root_ready() -> Path:
    root = arm64_check.DEFAULT_ROOT
    if os.geteuid() != 0:
        pytest.skip("the arm64 userland check needs root (chroot, binfmt)")
    if not (root / arm64_check.READY).is_file():
        pytest.skip(f"no prepared arm64 root at {root} (python scripts/arm64_check.py prepare)")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("qemu-aarch64 is not registered with binfmt_misc on this machine")
    return root


def test_tiny_arm64_bundle_answers_as_on_x86(tmp_path, tmp_path_factory, sample_data):
    root = _root_ready()
    pytest.importorskip("torch")
    from pcbedge import api
    from pcbedge.testing import tiny_bundle
    _, export = tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")
    bundle = api.build_bundle("arm64-cpu", export, tmp_path / "arm64", progress=False)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "arm64_check.py"), "run",
                           "--root", str(root), "--bundle", str(bundle), "--reference",
                           str(export), "--data", str(sample_data), "--list", "bench.txt",
                           "--boards", "1", "--out", str(out), "--no-wait",
                           # a random tiny model: its gates are not the point here
                           ], capture_output=True, text=True, timeout=900)
    if proc.returncode == arm64_check.BUSY:
        pytest.skip("the arm64 root is in use by another run (a long check): not waiting")
    result = json.loads((out / "arm64_check.json").read_text())
    assert result["answers"]["agree"], (result["answers"], proc.stdout[-2000:])
    assert result["environment_arm64"] is not None
    assert result["emulated_latency_ms"]["note"].startswith("qemu")


def test_prepare_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert arm64_check.main(["prepare"]) == 2


def test_compare_predictions_tolerances(tmp_path):
    rec = {"id": "g/1", "defects": [{"type": "short", "bbox": [1, 2, 3, 4], "confidence": 0.9}]}
    other = {"id": "g/1", "defects": [{"type": "short", "bbox": [1.5, 2, 3, 4],
                                       "confidence": 0.91}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(other) + "\n")
    r = arm64_check.compare_predictions(tmp_path / "a.jsonl", tmp_path / "b.jsonl", 1.0, 0.02)
    assert r["agree"] and r["max_box_diff_px"] == 0.5
    assert not arm64_check.compare_predictions(tmp_path / "a.jsonl", tmp_path / "b.jsonl",
                                               0.1, 0.02)["agree"]
    other["defects"][0]["type"] = "open"
    (tmp_path / "b.jsonl").write_text(json.dumps(other) + "\n")
    assert arm64_check.compare_predictions(tmp_path / "a.jsonl", tmp_path / "b.jsonl", 1.0,
                                           0.02)["boards_with_other_defects"] == ["g/1"]
