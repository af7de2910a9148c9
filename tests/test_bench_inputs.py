"""Bench inputs checked before anything is timed (issue 20): the reference is the FP32 export of
the bundle's model, annotation boxes lie inside their image, a bad line late in a list fails
before the first board is answered, and no NaN or infinity reaches a file the bench writes."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pcbedge.benchmarks import accuracy as acc_mod
from pcbedge.benchmarks import strict_json
from pcbedge.benchmarks import workload as wl
from pcbedge.benchmarks.harness import run_benchmark
from pcbedge.benchmarks.reference import check_reference
from pcbedge.data.deeppcb import parse_annotation, read_list
from pcbedge.errors import BundleError, DatasetError, GateFailed, InputImageError
from pcbedge.runtime.protocol import Encoded, Prepared, Runner

FAST = {"queries": 2, "min_seconds": 0.0, "warmup": 0, "progress": False}
BOARD = "group00041/00041/00041160"
ANNOTATION = "group00041/00041_not/00041160.txt"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model folder, its FP32 export), the session's shared export."""
    pytest.importorskip("torch")
    from pcbedge.testing import tiny_bundle
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")


def _copy_with(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


class CountingRunner(Runner):
    """Answers one fixed defect and counts every call."""

    def __init__(self):
        self.manifest = {}
        self.calls = 0

    def prepare(self, image, template=None):
        self.calls += 1
        return Prepared(None)

    def encode(self, prepared):
        return Encoded(None, prepared)

    def answer(self, enc, question, **kw):
        self.calls += 1
        d = {"type": "short", "bbox": [10.0, 10.0, 40.0, 40.0], "confidence": 0.9,
             "region": 0}
        return {"answer": "one short", "intent": "describe", "filter": "all", "count": 1,
                "defects": [d], "complete": True, "latency_ms": {"vision": 1.0}}


def _stub_folder(tmp_path: Path) -> Path:
    """The "bundle" of a stub runner: an empty folder (open_runner is monkeypatched)."""
    folder = tmp_path / "stub-bundle"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------- the reference

def test_reference_of_another_model_is_refused_before_timing(tiny, tmp_path, monkeypatch):
    _, export = tiny
    other = _copy_with(export, tmp_path / "other", lambda m: m["source_model"].update(
        name="other-model", sha256="cd" * 32))
    opened = []
    monkeypatch.setattr(wl, "open_runner", lambda p, **kw: opened.append(p))
    with pytest.raises(BundleError) as err:
        run_benchmark(export, reference=other, out_dir=tmp_path / "out", **FAST)
    msg = str(err.value)
    assert "'other-model'" in msg and "cdcdcdcdcdcd" in msg and "'tiny-pcbvlm'" in msg
    assert "fix: pass the FP32 export the bundle was built from" in msg
    assert err.value.exit_code == 17
    assert opened == [] and not (tmp_path / "out").exists()


def test_reference_checks_against_a_model_folder_and_a_rebuilt_export(tiny, tmp_path):
    model, export = tiny
    assert check_reference(export, json.loads((export / "manifest.json").read_text()),
                           model)["status"] == "verified"
    # another export of the same weights (its manifest differs): still the same model
    again = _copy_with(export, tmp_path / "again", lambda m: m.update(created_utc="later"))
    built = _copy_with(export, tmp_path / "built", lambda m: m.update(
        precision={"vision": "int8", "decoder": "fp32"},
        reference={"export_dir": str(export), "manifest_sha256": "0" * 64}))
    manifest = json.loads((built / "manifest.json").read_text())
    check = check_reference(built, manifest, again)
    assert check["status"] == "verified" and "sha256" in check["note"]
    # a model folder with other weights is another model
    changed = Path(shutil.copytree(model, tmp_path / "retrained"))
    with open(changed / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="'retrained'.*two different models"):
        check_reference(built, manifest, changed)


def test_reference_must_be_fp32(tiny, tmp_path):
    _, export = tiny
    int8 = _copy_with(export, tmp_path / "int8", lambda m: m.update(
        precision={"vision": "int8", "decoder": "fp32"}))
    with pytest.raises(BundleError, match=r"int8 is not an FP32 export \(precision "
                                          r"\{'vision': 'int8'\}\)"):
        check_reference(export, json.loads((export / "manifest.json").read_text()), int8)


def test_reference_without_a_hash_is_measured_with_a_warning(tiny, tmp_path, capsys):
    _, export = tiny
    old = _copy_with(export, tmp_path / "old", lambda m: m["source_model"].pop("sha256"))
    check = check_reference(export, json.loads((export / "manifest.json").read_text()), old)
    assert check["status"] == "unverified" and str(old) in check["note"]
    assert "warning: cannot verify" in capsys.readouterr().err
    other_family = _copy_with(old, tmp_path / "fam", lambda m: m.update(family="qwen2_vl"))
    with pytest.raises(BundleError, match="qwen2_vl"):
        check_reference(export, json.loads((export / "manifest.json").read_text()),
                        other_family)


# ----------------------------------------------------------------------------- annotations

@pytest.mark.parametrize("line, reason", [
    ("600 600 700 650 1", r"box \(600, 600, 700, 650\) lies outside the 640x640 image b.jpg"),
    ("10 20 30 641 1", r"box \(10, 20, 30, 641\) lies outside the 640x640"),
    ("-3 20 30 40 1", r"box \(-3, 20, 30, 40\) lies outside"),
    ("120 40 120 90 2", r"empty box \(120, 40, 120, 90\): x2 <= x1"),
    ("120 90 130 90 2", r"empty box .*: y2 <= y1"),
    ("10 20 30 40 1.5", "unknown defect type id 1.5"),
])
def test_annotation_boxes_inside_the_image(tmp_path, line, reason):
    ann = tmp_path / "a.txt"
    ann.write_text(f"0 0 640 640 1\n{line}\n")
    with pytest.raises(DatasetError, match=reason) as err:
        parse_annotation(ann, (640, 640), Path("b.jpg"))
    assert f"{ann}:2:" in str(err.value) and "fix: " in str(err.value)


def _dataset(root: Path, sample_data: Path, n_lines: int, last_line: str | None = None) -> Path:
    for rel in (f"{BOARD}_test.jpg", f"{BOARD}_temp.jpg", ANNOTATION):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_data / rel, root / rel)
    lines = [f"{BOARD}.jpg {ANNOTATION}"] * n_lines + ([last_line] if last_line else [])
    (root / "bench.txt").write_text("\n".join(lines) + "\n")
    return root


def test_list_refuses_a_box_outside_and_a_template_of_another_size(tmp_path, sample_data):
    from PIL import Image
    data = _dataset(tmp_path, sample_data, 2)
    with open(data / ANNOTATION, "a") as f:
        f.write("630 100 660 120 1\n")
    with pytest.raises(DatasetError, match=r"00041160.txt:\d+: box \(630, 100, 660, 120\) lies "
                                           r"outside the 640x640 image .*00041160_test.jpg"):
        read_list(data, "bench.txt")
    shutil.copyfile(sample_data / ANNOTATION, data / ANNOTATION)
    Image.new("L", (600, 640), 40).save(data / f"{BOARD}_temp.jpg", format="JPEG")
    with pytest.raises(InputImageError, match=r"bench.txt:1: template .* is 600x640, board .* "
                                              r"is 640x640"):
        read_list(data, "bench.txt")
    assert [b.list_line for b in read_list(sample_data, "bench.txt")[:2]] == [1, 2]


# ----------------------------------------------------------------------------- late bad lines

@pytest.mark.parametrize("kind", ["format", "box", "truncated"])
def test_a_bad_last_line_of_200_fails_before_any_answer(tmp_path, sample_data, monkeypatch,
                                                        kind):
    data = _dataset(tmp_path / "data", sample_data, 199)
    late = "group00041/00041/late"
    if kind == "format":
        last, error, names = f"{BOARD}.jpg", DatasetError, ("bench.txt:200:",)
    else:
        for suffix in ("_test.jpg", "_temp.jpg"):
            shutil.copyfile(data / f"{BOARD}{suffix}", data / f"{late}{suffix}")
        last = f"{late}.jpg group00041/00041_not/late.txt"
        (data / "group00041/00041_not/late.txt").write_text(
            "10 10 20 20 1\n" if kind == "truncated" else "10 10 20 20 1\n630 0 700 9 2\n")
        error, names = (InputImageError, ("bench.txt:200:", "late_test.jpg")) \
            if kind == "truncated" else (DatasetError, ("late.txt:2:", "640x640"))
        if kind == "truncated":
            raw = (data / f"{late}_test.jpg").read_bytes()
            (data / f"{late}_test.jpg").write_bytes(raw[: len(raw) // 2])
    with open(data / "bench.txt", "a") as f:
        f.write(last + "\n")
    runner = CountingRunner()
    monkeypatch.setattr(wl, "open_runner", lambda p, **kw: runner)
    with pytest.raises(error) as err:
        run_benchmark(_stub_folder(tmp_path), data=data, list_file="bench.txt",
                      out_dir=tmp_path / "out", **FAST)
    assert all(n in str(err.value) for n in names), str(err.value)
    assert runner.calls == 0 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- strict JSON

def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_replace_nonfinite_walks_numpy_and_nesting():
    obj = {"a": [1.0, float("nan"), {"b": np.float32("inf")}], "c": np.array([1.5, -np.inf]),
           "d": True, "e": 3, "f": None, "g": "nan"}
    clean, found = strict_json.replace_nonfinite(obj)
    assert clean == {"a": [1.0, None, {"b": None}], "c": [1.5, None], "d": True, "e": 3,
                     "f": None, "g": "nan"}
    assert found == ["$.a[1]", "$.a[2].b", "$.c[1]"]
    _strict_loads(strict_json.dumps(clean))
    with pytest.raises(ValueError):
        strict_json.dumps({"x": float("nan")})   # a value that slipped past fails loudly


def test_a_nan_metric_writes_strict_json_and_fails_its_gate(tmp_path, monkeypatch):
    # (a NaN confidence from a runner is refused by the metrics, DatasetError: not injected)
    monkeypatch.setattr(wl, "open_runner", lambda p, **kw: CountingRunner())
    real = acc_mod.score_accuracy

    def nan_accuracy(workload, answers):
        acc = real(workload, answers)
        acc.update(deeppcb_map=float("nan"), map_05=np.float32("inf"))
        return acc

    monkeypatch.setattr(acc_mod, "score_accuracy", nan_accuracy)
    out = tmp_path / "out"
    with pytest.raises(GateFailed, match="min_map: null not >= 0"):
        run_benchmark(_stub_folder(tmp_path), out_dir=out, max_boards=2,
                      gates={"min_map": 0.0, "p95_ms_max": 1e9}, **FAST)
    report = _strict_loads((out / "report.json").read_text())
    assert report["accuracy"]["deeppcb_map"] is None and report["accuracy"]["map_05"] is None
    paths = report["nonfinite_values"]["paths"]
    assert "$.accuracy.deeppcb_map" in paths and "$.accuracy.map_05" in paths
    gate = report["gates"]["min_map"]
    assert gate["status"] == "failed" and gate["value"] is None and "NaN" in gate["reason"]
    for line in (out / "predictions.jsonl").read_text().splitlines():
        assert _strict_loads(line)["defects"][0]["confidence"] == 0.9
    for name in ("junit.xml", "summary.md"):   # a figure reads "n/a", never "nan" or "inf"
        text = (out / name).read_text()
        assert not re.search(r'(=\s*|"|\|\s*)-?(nan|inf)\b', text, re.I), name
    assert all(math.isfinite(v) for v in report["latency_samples_ms"]["total"])
