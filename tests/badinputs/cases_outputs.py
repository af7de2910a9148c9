"""Outputs (issue 20): ``--overwrite`` replaces only what pcbedge made, ``--out`` never is,
contains or lies inside an input, a full disk or a read-only folder is an OutputError naming the
output at every write (export, quantize, publish, report, answers), and a batch is checked whole
(NaN ids, a bad last line) before anything is answered. Disk failures are injected in-process
(the cases run through click's runner, so a patched function is seen by the command; each patch
is undone by ``env.defer``)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from badinputs.cases_core import GOOD, GOOD2, build, plain_pairs, read_only_dir
from badinputs.harness import REPO, Call, Env, Q, ask, case

SAMPLE = REPO / "pcbedge/data/sample"
BOARD = "group00041/00041/00041160"
ANNOTATION = "group00041/00041_not/00041160.txt"
BENCH_FAST = ("--queries", "2", "--min-seconds", "0", "--warmup", "0", "--boards", "1",
              "--quiet")


def patch(env: Env, owner, name: str, value) -> None:
    """``owner.name = value`` for this case only."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    env.defer(lambda: setattr(owner, name, old))


def disk_full(filename: str | None = None, *, wrapped: bool = False):
    """A stand-in for a write that hits a full disk (``wrapped``: as a library that re-raises
    it as RuntimeError, keeping only the text)."""
    def write(*args, **kwargs):
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        if wrapped:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {err}")
        raise err
    return write


def dataset(folder: Path) -> Path:
    """A DeepPCB-layout folder holding one board of the embedded sample and bench.txt."""
    for rel in (f"{BOARD}_test.jpg", f"{BOARD}_temp.jpg", ANNOTATION):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / rel, folder / rel)
    (folder / "bench.txt").write_text(f"{BOARD}.jpg {ANNOTATION}\n")
    return folder


def user_folder(folder: Path) -> Path:
    """A folder pcbedge did not make: a user's notes and a sub-folder."""
    (folder / "Documents").mkdir(parents=True)
    (folder / "Documents" / "thesis.tex").write_text("\\chapter{PCB}")
    (folder / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
    (folder / "manifest.json").write_text('{"name": "my web app"}')   # not pcbedge's manifest
    return folder


# --overwrite replaces only what pcbedge made --------------------------------------------------

@case("build-overwrite-not-a-bundle", "OutputError")
def _(env):
    out = user_folder(env.tmp / "out")
    return Call(build(env, "--overwrite", out=out),
                (str(out), "not a bundle made by pcbedge", "not even with --overwrite"),
                unchanged=out)


@case("export-overwrite-home-folder", "OutputError")
def _(env):
    home = user_folder(env.tmp / "home" / "alice")
    return Call(["export", "--model", str(env.model), "--out", str(home), "--overwrite"],
                (str(home), ".bashrc", "never replaced"), unchanged=home)


@case("bench-out-not-a-report-folder", "OutputError")
def _(env):
    out = user_folder(env.tmp / "out")
    return Call(["bench", str(env.export), "--out", str(out), *BENCH_FAST],
                (str(out), "not a bench report folder made by pcbedge"), unchanged=out)


# --out never is, contains or lies inside an input ----------------------------------------------

@case("build-out-is-calibration", "OutputError")
def _(env):
    cal = plain_pairs(env.tmp / "cal", 9)
    return Call(build(env, "--calibration", str(cal), "--overwrite", out=cal),
                (str(cal), "is the calibration folder"), unchanged=cal)


@case("build-out-inside-export", "OutputError")
def _(env):
    export = env.bundle_copy()
    out = export / "x86-cpu"
    return Call(build(env, "--overwrite", export=export, out=out),
                (str(out), "lies inside the export"), unchanged=export)


@case("build-out-contains-export", "OutputError")
def _(env):
    work = env.tmp / "work"
    export = Path(shutil.copytree(env.export, work / "export"))
    return Call(build(env, "--overwrite", export=export, out=work),
                (str(work), "contains the export"), unchanged=work)


@case("bench-out-contains-data", "OutputError")
def _(env):
    runs = env.tmp / "runs"
    data = dataset(runs / "data")
    return Call(["bench", str(env.export), "--data", str(data), "--list", "bench.txt", "--out",
                 str(runs), *BENCH_FAST], (str(runs), "contains the data folder"),
                unchanged=runs)


@case("bench-out-inside-bundle", "OutputError")
def _(env):
    bundle = env.bundle_copy()
    return Call(["bench", str(bundle), "--out", str(bundle / "report"), *BENCH_FAST],
                ("report", "lies inside the bundle"), unchanged=bundle)


# a full disk, a read-only folder: OutputError at every write ----------------------------------

@case("export-disk-full", "OutputError")
def _(env):
    import onnx
    patch(env, onnx, "save", disk_full())
    out = env.tmp / "out"
    return Call(["export", "--model", str(env.model), "--out", str(out), "--no-check"],
                (str(out), "no space left", "free"), absent=(out,))


@case("build-disk-full-quantize", "OutputError")
def _(env):   # once CalibrationError "got no input": the quantizer failed before any feed
    import onnxruntime.quantization as ortq
    patch(env, ortq, "quantize_static", disk_full(wrapped=True))
    out = env.tmp / "out"
    return Call(build(env, out=out), (str(out), "no space left", "needs about"), absent=(out,))


@case("build-disk-full-preprocess", "OutputError")
def _(env):   # once ExportError "set preprocess=False"
    from onnxruntime.quantization import shape_inference
    patch(env, shape_inference, "quant_pre_process", disk_full())
    out = env.tmp / "out"
    return Call(build(env, out=out), (str(out), "no space left"), absent=(out,))


@case("build-disk-full-publish", "OutputError")
def _(env):   # the manifest, written last, is the first fsync of a build
    patch(env, os, "fsync", disk_full())
    out = env.tmp / "out"
    return Call(build(env, out=out), (str(out), "no space left", "needs about", "free"),
                absent=(out,))


@case("bench-disk-full-report", "OutputError")
def _(env):
    patch(env, os, "fsync", disk_full())
    out = env.tmp / "bench-out"
    return Call(["bench", str(env.export), "--out", str(out), *BENCH_FAST],
                (str(out / "predictions.jsonl"), "no space left"),
                absent=(out / "predictions.jsonl", out / "report.json"))


@case("bench-out-read-only", "OutputError")
def _(env):
    ro = read_only_dir(env, env.tmp / "ro")
    return Call(["bench", str(env.export), "--out", str(ro / "bench"), *BENCH_FAST],
                (str(ro / "bench"), "permission denied"), absent=(ro / "bench",))


# batches: checked whole before anything is answered --------------------------------------------

def batch_call(env: Env, lines: list[str], names: tuple[str, ...], *, bundle=None,
               out: Path | None = None) -> Call:
    env.pair()
    src = env.tmp / "pair" / "in.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = out or env.tmp / "answers.jsonl"
    absent = () if out.exists() else (out,)
    return Call(["ask", str(bundle or env.export), "--batch", str(src), "--out", str(out)],
                names, absent=absent, unchanged=env.tmp / "pair")


def line(i: int, **edit) -> str:
    return json.dumps({"id": i, "image": "board_test.png", "template": "board_temp.png",
                       "question": "where are the shorts?", **edit})


case("batch-id-nan", "DatasetError", lambda env: batch_call(
    env, [GOOD, GOOD2.replace('"id": 2', '"id": NaN')], ("in.jsonl line 2", "NaN")))
case("batch-id-infinite", "DatasetError", lambda env: batch_call(
    env, [line(1).replace('"id": 1', '"id": 1e999')],
    ("in.jsonl line 1", "id inf", "not a string or a finite number")))


@case("batch-bad-line-late-answers-nothing", "InputImageError")
def _(env):
    # the bundle is damaged too: a line found bad after loading it would be a BundleError, so
    # this error shows the whole file was checked before the model was loaded
    bundle = env.bundle_copy()
    with open(bundle / "vision.onnx", "ab") as f:
        f.write(b"\0")
    lines = [line(i) for i in range(1, 40)] + [line(40, image="gone_test.png")]
    return batch_call(env, lines, ("in.jsonl line 40", "id 40", "gone_test.png"), bundle=bundle)


case("batch-out-is-the-batch-file", "OutputError", lambda env: batch_call(
    env, [GOOD], ("in.jsonl", "is the batch file"), out=env.tmp / "pair" / "in.jsonl"))
case("batch-out-is-an-image", "OutputError", lambda env: batch_call(
    env, [GOOD], ("board_temp.png", "is the template of", "line 1"),
    out=env.tmp / "pair" / "board_temp.png"))


@case("batch-disk-full", "OutputError")
def _(env):
    patch(env, os, "fsync", disk_full())
    return batch_call(env, [GOOD, GOOD2], ("answers.jsonl", "no space left"))


@case("ask-show-is-the-image", "OutputError")
def _(env):
    """`--show` naming the board image would overwrite the evidence with the drawing."""
    test, temp = env.pair()
    return Call(ask(env, test, temp, Q, "--show", str(test)),
                (f"output {test} is the board image", "never replaces"), unchanged=test.parent)
