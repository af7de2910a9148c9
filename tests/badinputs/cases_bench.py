"""Bench inputs (issue 20): a reference of another model or not FP32, annotation boxes outside
the image or empty, unknown defect types, a bad line or image late in a long list, a baseline
report whose latency samples are not numbers. Each is refused before anything is timed, so no
--out folder is made."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from badinputs.harness import REPO, Call, Env, case

SAMPLE = REPO / "pcbedge/data/sample"
BOARD = "group00041/00041/00041160"          # a 640x640 board of the embedded sample
ANNOTATION = "group00041/00041_not/00041160.txt"


def dataset(env: Env, *, annotation: str | None = None, n_lines: int = 1,
            last_line: str | None = None) -> Path:
    """A data folder holding one sample board (its annotation replaced by ``annotation``) and
    bench.txt naming it ``n_lines`` times, then ``last_line`` if given."""
    data = env.tmp / "data"
    for suffix in ("_test.jpg", "_temp.jpg"):
        dst = data / f"{BOARD}{suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / f"{BOARD}{suffix}", dst)
    ann = data / ANNOTATION
    ann.parent.mkdir(parents=True, exist_ok=True)
    if annotation is None:
        shutil.copyfile(SAMPLE / ANNOTATION, ann)
    else:
        ann.write_text(annotation)
    lines = [f"{BOARD}.jpg {ANNOTATION}"] * n_lines + ([last_line] if last_line else [])
    (data / "bench.txt").write_text("\n".join(lines) + "\n")
    return data


def bench(env: Env, data: Path, *extra, bundle: Path | None = None) -> list:
    return ["bench", str(bundle or env.export), "--data", str(data), "--list", "bench.txt",
            "--out", str(env.tmp / "bench-out"), "--quiet", *extra]


def bad_annotation(text: str, names: tuple[str, ...]) -> Callable[[Env], Call]:
    """A case: the one board's annotation file holds ``text`` (its second line is the bad one)."""
    def make(env: Env) -> Call:
        data = dataset(env, annotation="466 441 493 470 3\n" + text)
        return Call(bench(env, data), (f"{ANNOTATION}:2:", *names),
                    absent=(env.tmp / "bench-out",), unchanged=data)
    return make


case("bench-annotation-box-outside", "DatasetError", bad_annotation(
    "600 600 700 650 1\n", ("box (600, 600, 700, 650)", "outside the 640x640 image",
                            "00041160_test.jpg")))
case("bench-annotation-degenerate-box", "DatasetError", bad_annotation(
    "120 40 120 90 2\n", ("empty box (120, 40, 120, 90)", "x2 <= x1")))
case("bench-annotation-unknown-type", "DatasetError", bad_annotation(
    "10 20 30 40 9\n", ("unknown defect type id 9", "1..6")))


@case("bench-list-bad-last-line", "DatasetError")
def _(env):
    # 199 good lines, then one with a single field: found before the first board is answered
    data = dataset(env, n_lines=199, last_line=f"{BOARD}.jpg")
    return Call(bench(env, data), ("bench.txt:200:", "IMAGE ANNOTATION"),
                absent=(env.tmp / "bench-out",))


@case("bench-list-late-truncated-image", "InputImageError")
def _(env):
    data = dataset(env, n_lines=199)
    late = "group00041/00041/late"
    src = (SAMPLE / f"{BOARD}_test.jpg").read_bytes()
    (data / f"{late}_test.jpg").write_bytes(src[: len(src) // 2])   # the header still reads
    shutil.copyfile(SAMPLE / f"{BOARD}_temp.jpg", data / f"{late}_temp.jpg")
    with open(data / "bench.txt", "a") as f:
        f.write(f"{late}.jpg {ANNOTATION}\n")
    return Call(bench(env, data), ("bench.txt:200:", "late_test.jpg", "truncated"),
                absent=(env.tmp / "bench-out",))


@case("bench-reference-other-model", "BundleError")
def _(env):
    # the FP32 export of another model: same graphs here, but its manifest says which weights
    other = Path(shutil.copytree(env.export, env.tmp / "other-export"))
    m = json.loads((other / "manifest.json").read_text())
    m["source_model"].update(name="other-model", sha256="ab" * 32)
    (other / "manifest.json").write_text(json.dumps(m))
    return Call(["bench", str(env.built), "--reference", str(other), "--out",
                 str(env.tmp / "bench-out"), "--quiet"],
                ("other-export", "'other-model'", "abababababab", "'tiny-pcbvlm'",
                 "two different models", "the FP32 export the bundle was built from"),
                absent=(env.tmp / "bench-out",))


case("bench-reference-and-no-reference", "UsageError", lambda env: Call(
    ["bench", str(env.built), "--reference", str(env.export), "--no-reference", "--out",
     str(env.tmp / "bench-out"), "--quiet"],
    ("--no-reference contradict",), absent=(env.tmp / "bench-out",)))
case("bench-reference-not-fp32", "BundleError", lambda env: Call(
    ["bench", str(env.export), "--reference", str(env.built), "--out",
     str(env.tmp / "bench-out"), "--quiet"],
    (str(env.built), "not an FP32 export", "'int8'"), absent=(env.tmp / "bench-out",)))


@case("bench-compare-baseline-not-numbers", "PcbEdgeError")
def _(env):
    base = env.tmp / "base" / "report.json"
    base.parent.mkdir()
    base.write_text(json.dumps({"latency_samples_ms": {"total": [12.5, "13.1 ms", 12.9]}}))
    return Call(["bench", str(env.export), "--compare", str(base), "--out",
                 str(env.tmp / "bench-out"), "--quiet"],
                ("report.json", "latency_samples_ms.total[1]", "'13.1 ms'", "not a number"),
                absent=(env.tmp / "bench-out",))
