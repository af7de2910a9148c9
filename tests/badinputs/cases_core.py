"""The first catalogue: images, questions, batches, targets, calibration, builds, bundles, models,
hardware, outputs and bench (issue 10)."""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from badinputs.harness import REPO, SAMPLE_JPG, Call, Env, Q, ask, case, png_header

# images ---------------------------------------------------------------------------------------

case("ask-missing-image", "InputImageError", lambda env: Call(
    ask(env, env.tmp / "nope_test.png", env.pair()[1]), ("nope_test.png", "not found")))
case("ask-missing-template", "InputImageError", lambda env: Call(
    ask(env, env.pair()[0], env.tmp / "nope_temp.png"), ("nope_temp.png", "not found")))


def bad_board(name: str, data: Callable[[], bytes], names: tuple[str, ...], *,
              size=(200, 150), subprocess: bool = False) -> Callable[[Env], Call]:
    """A case: ``ask --show drawn.png`` with the board image ``name`` holding ``data()``."""
    def make(env: Env) -> Call:
        _, temp = env.pair(size)
        (env.tmp / name).write_bytes(data())
        show = env.tmp / "drawn.png"
        return Call(ask(env, env.tmp / name, temp, Q, "--show", show), names, absent=(show,),
                    subprocess=subprocess)
    return make


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 40).save(buf, format="PNG")
    return buf.getvalue()


case("ask-corrupt-image", "InputImageError", bad_board(
    "corrupt_test.jpg", lambda: b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(4000),
    ("corrupt_test.jpg", "cannot be decoded")))
case("ask-truncated-jpeg", "InputImageError", bad_board(
    "cut_test.jpg", lambda: SAMPLE_JPG.read_bytes()[:SAMPLE_JPG.stat().st_size // 2],
    ("cut_test.jpg", "truncated"), size=(640, 640)))
case("ask-zero-byte-image", "InputImageError", bad_board(
    "empty_test.png", lambda: b"", ("empty_test.png", "0 bytes")))
case("ask-not-an-image", "InputImageError", bad_board(
    "notes_test.png", lambda: b"board 7: looks fine\n", ("notes_test.png", "cannot be decoded")))
case("ask-huge-image", "InputImageError", bad_board(   # refused from the header, not decoded
    "huge_test.png", lambda: png_header(8000, 6000),
    ("huge_test.png", "8000x6000", "40,000,000"), subprocess=True))
case("ask-tiny-image", "InputImageError", bad_board(
    "small_test.png", lambda: png_bytes((16, 16)), ("small_test.png", "16x16", "32 px")))


@case("ask-template-other-size", "InputImageError")
def _(env):
    test, _ = env.pair()
    temp = env.tmp / "other_temp.png"
    Image.new("L", (100, 100), 40).save(temp)
    show = env.tmp / "drawn.png"
    return Call(ask(env, test, temp, Q, "--show", str(show)),
                ("other_temp.png", "100x100", "200x150"), absent=(show,))


# questions and options --------------------------------------------------------------------------

case("ask-empty-question", "QuestionError", lambda env: Call(
    ask(env, *env.pair(), ""), ("question is empty",)))
case("ask-blank-question", "QuestionError", lambda env: Call(
    ask(env, *env.pair(), " \t "), ("question is empty",)))
case("ask-10000-char-question", "QuestionError", lambda env: Call(
    ask(env, *env.pair(), "where " * 1666 + "shor"), ("10000 characters", "2000")))


@case("ask-invalid-utf8-question", "QuestionError")
def _(env):
    # bytes in argv that are not UTF-8 reach Python as lone surrogates ("\udcff")
    argv = ask(env, *env.pair(), "")[:-1] + [b"where is the short \xff\xfe?"]
    return Call(argv, ("\\udcff", "not valid text"), subprocess=True)


case("ask-max-new-tokens-zero", "UsageError", lambda env: Call(
    ask(env, *env.pair(), Q, "--max-new-tokens", "0"),
    ("--max-new-tokens", "0 is not in the range")))
case("ask-max-new-tokens-negative", "UsageError", lambda env: Call(
    ask(env, *env.pair(), Q, "--max-new-tokens", "-5"), ("-5 is not in the range",)))

case("finetune-paste-share-above-one", "UsageError", lambda env: Call(
    ["finetune", "--data", str(env.tmp / "data"), "--out", str(env.tmp / "model"),
     "--p-paste", "1.5"], ("--p-paste", "1.5 is not in the range"),
    absent=(env.tmp / "model",)))

case("finetune-hard-mining-negative", "UsageError", lambda env: Call(
    ["finetune", "--data", str(env.tmp / "data"), "--out", str(env.tmp / "model"),
     "--hard-mining", "-0.5"], ("--hard-mining", "-0.5 is not in the range"),
    absent=(env.tmp / "model",)))


@case("finetune-resume-other-settings", "ModelError")
def _(env):
    saved = env.tmp / "model" / "checkpoint_stage_a"
    saved.mkdir(parents=True)
    (saved / "config.json").write_text("{}")
    (saved / "generation_config.json").write_text(json.dumps({"stage_settings": {"seed": 0}}))
    return Call(["finetune", "--data", str(env.tmp / "data"), "--out", str(env.tmp / "model"),
                 "--resume", "--seed", "3"],
                ("checkpoint_stage_a", "other settings", "seed"), unchanged=env.tmp / "model")


@case("ask-show-unknown-format", "UsageError")
def _(env):
    show = env.tmp / "drawn.gif"
    return Call(ask(env, *env.pair(), Q, "--show", str(show)), ("drawn.gif", ".png"),
                absent=(show,))


# batch ------------------------------------------------------------------------------------------

def batch(names: tuple[str, ...], *lines: str) -> Callable[[Env], Call]:
    """A case: ``ask --batch in.jsonl --out answers.jsonl`` over ``lines``."""
    def make(env: Env) -> Call:
        env.pair()
        src, out = env.tmp / "pair" / "in.jsonl", env.tmp / "answers.jsonl"
        src.write_text("".join(line + "\n" for line in lines))
        return Call(["ask", env.export, "--batch", src, "--out", out], names, absent=(out,))
    return make


GOOD = json.dumps({"id": 1, "image": "board_test.png", "template": "board_temp.png",
                   "question": Q})
GOOD2 = GOOD.replace('"id": 1', '"id": 2')
case("batch-line-not-json", "DatasetError", batch(
    ("in.jsonl line 2", "not valid JSON"), GOOD, '{"id": 2, "image": "board_test.png",'))
case("batch-line-missing-key", "DatasetError", batch(
    ("in.jsonl line 1", "missing question"),
    json.dumps({"id": 1, "image": "a.png", "template": "b.png"})))
case("batch-repeated-id", "DatasetError", batch(
    ("line 3", "id 1 repeats line 1"), GOOD, GOOD2, GOOD))
case("batch-bad-image-mid-run", "InputImageError", batch(
    ("in.jsonl line 2", "id 2", "gone_test.png"), GOOD,
    GOOD2.replace("board_test.png", "gone_test.png")))


# targets, calibration, build --------------------------------------------------------------------

def build(env: Env, *extra: str, target="x86-cpu", export=None, out=None) -> list:
    return ["build", "--target", str(target), "--export", str(export or env.export), "--out",
            str(out or env.tmp / "out"), *extra]


def profile(env: Env, edit: Callable[[str], str]) -> Path:
    text = (REPO / "pcbedge/targets/x86-cpu.toml").read_text().replace(
        'name = "x86-cpu"', 'name = "my-cpu"')
    path = env.tmp / "my-cpu.toml"
    path.write_text(edit(text))
    return path


case("build-unknown-target", "TargetError", lambda env: Call(
    build(env, target="x86-gpu"), ("'x86-gpu'", "x86-cpu", "jetson-orin"),
    absent=(env.tmp / "out",), subprocess=True))
case("build-profile-wrong-field", "TargetError", lambda env: Call(
    build(env, target=profile(env, lambda t: t.replace("threads = 2", "threads = 0"))),
    ("my-cpu.toml", "'threads' = 0", ">= 1"), absent=(env.tmp / "out",)))
case("build-profile-unknown-key", "TargetError", lambda env: Call(
    build(env, target=profile(env, lambda t: t.replace("threads = 2", "thread = 2"))),
    ("my-cpu.toml", "unknown key 'thread'"), absent=(env.tmp / "out",)))


def plain_pairs(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        for kind in ("test", "temp"):
            Image.new("L", (64, 64), 40 + i).save(folder / f"b{i}_{kind}.png")
    return folder


@case("build-calibration-too-few", "CalibrationError")
def _(env):
    cal = plain_pairs(env.tmp / "cal", 3)
    return Call(build(env, "--calibration", str(cal)), (str(cal), "3 board(s)", "minimum 8"),
                absent=(env.tmp / "out",))


@case("build-calibration-unreadable", "CalibrationError")
def _(env):
    cal = plain_pairs(env.tmp / "cal", 9)
    (cal / "b4_test.png").write_bytes(b"")
    return Call(build(env, "--calibration", str(cal)), ("board b4", "b4_test.png", "0 bytes"),
                absent=(env.tmp / "out",))


case("build-calibration-missing", "CalibrationError", lambda env: Call(
    build(env, "--calibration", env.tmp / "no-cal"), ("no-cal", "does not exist"),
    absent=(env.tmp / "out",)))
case("build-export-missing", "BundleError", lambda env: Call(
    build(env, export=env.tmp / "no-export"), ("no-export", "folder not found"),
    absent=(env.tmp / "out",)))
case("build-from-a-built-bundle", "BundleError", lambda env: Call(
    build(env, export=env.built), (str(env.built), "not a float export"),
    absent=(env.tmp / "out",)))


@case("build-out-not-empty", "OutputError")
def _(env):
    out = env.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return Call(build(env), (str(out), "not empty", "--overwrite"), unchanged=out)


@case("build-out-read-only", "OutputError")
def _(env):
    ro = read_only_dir(env, env.tmp / "ro")
    return Call(build(env, out=ro / "x86"), (str(ro),), absent=(ro / "x86",))


# bundles ----------------------------------------------------------------------------------------

def edit_manifest(bundle: Path, edit: Callable[[dict], None], rehash: bool = False) -> Path:
    from pcbedge.bundle.manifest import list_files
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if rehash:
        m["files"] = list_files(bundle)
    path.write_text(json.dumps(m, indent=2))
    return bundle


def tampered(edit: Callable[[Path, Env], None], names: tuple[str, ...],
             src: str = "export") -> Callable[[Env], Call]:
    """A case: ``ask`` with a copy of the tiny export (or built bundle) changed by ``edit``."""
    def make(env: Env) -> Call:
        b = env.bundle_copy(getattr(env, src))
        edit(b, env)
        return Call(ask(env, *env.pair(), bundle=b), tuple(n.format(b=b) for n in names))
    return make


def append_byte(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


case("ask-bundle-missing", "BundleError", lambda env: Call(
    ask(env, *env.pair(), bundle=env.tmp / "no-bundle"), ("no-bundle", "not found")))
case("ask-bundle-newer-schema", "BundleError", tampered(
    lambda b, env: edit_manifest(b, lambda m: m.update(schema_version=2)),
    ("schema_version 2", "upgrade pcbedge")))
case("ask-bundle-hash-mismatch", "BundleError", tampered(
    lambda b, env: append_byte(b / "vision.onnx"), ("vision.onnx", "sha256")))
case("ask-bundle-interrupted", "BundleError", tampered(
    lambda b, env: (b / "manifest.json").unlink(), ("{b}", "interrupted")))
case("ask-bundle-manifest-not-json", "BundleError", tampered(
    lambda b, env: (b / "manifest.json").write_text('{"schema_version": 1, "kind": '),
    ("manifest.json", "not valid JSON")))


@case("ask-bundle-external-data-outside", "BundleError")
def _(env):
    import onnx
    b = env.bundle_copy()
    model = onnx.load(str(b / "vision.onnx"))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (env.tmp / "outside.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"),
                       ("length", str((env.tmp / "outside.bin").stat().st_size))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(b / "vision.onnx"))
    edit_manifest(b, lambda m: None, rehash=True)
    return Call(ask(env, *env.pair(), bundle=b), ("vision.onnx", "'../outside.bin'"))


# models -----------------------------------------------------------------------------------------

def pickle_folder(env: Env, *copies: str) -> Path:
    folder = env.tmp / "pickled"
    folder.mkdir()
    for name in copies:
        shutil.copyfile(env.model / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not loaded, only named")
    return folder


def pickled(names: tuple[str, ...], *copies: str, verb: str = "export") -> Callable:
    """A case: ``export --model`` (or ``ask --model``) a folder holding pytorch_model.bin."""
    def make(env: Env) -> Call:
        m, out = pickle_folder(env, *copies), env.tmp / "out"
        if verb == "ask":
            test, temp = env.pair()
            return Call(["ask", "--model", m, "--image", test, "--template", temp, Q],
                        (str(m), *names))
        return Call(["export", "--model", m, "--out", out], (str(m), *names), absent=(out,))
    return make


case("export-model-pickle-only", "ModelError", pickled(("pytorch_model.bin", "pickle")))
case("export-model-pickle-weights", "ModelError", pickled(
    ("model.safetensors", "pytorch_model.bin", "pickle"),
    "config.json", "tokenizer.json", "generation_config.json"))
case("export-model-missing", "ModelError", lambda env: Call(
    ["export", "--model", env.tmp / "no-model", "--out", env.tmp / "out"],
    ("no-model", "not found"), absent=(env.tmp / "out",)))
case("export-precision-unknown", "ExportError", lambda env: Call(
    ["export", "--model", env.model, "--out", env.tmp / "out", "--precision", "fp8"],
    ("'fp8'", "fp32, fp16, bf16"), absent=(env.tmp / "out",)))
case("export-precision-not-of-the-family", "ExportError", lambda env: Call(
    ["export", "--model", env.model, "--out", env.tmp / "out", "--precision", "fp16"],
    ("exports fp32 graphs, not fp16", "--precision fp32"), absent=(env.tmp / "out",)))
case("ask-model-pickle-only", "ModelError", pickled(("neither a bundle",), verb="ask"))


# hardware ---------------------------------------------------------------------------------------

def other_arch() -> str:
    return "aarch64" if platform.machine().lower() in ("x86_64", "amd64") else "x86_64"


case("ask-bundle-other-arch", "HardwareMismatchError", tampered(
    lambda b, env: edit_manifest(b, lambda m: m["target"].update(arch=other_arch())),
    (other_arch(),), src="built"))


@case("ask-bundle-unavailable-provider", "HardwareMismatchError")
def _(env):
    import onnxruntime as ort
    from pcbedge.targets.profile import PROVIDERS
    missing = next((p for p in PROVIDERS if p not in ort.get_available_providers()), None)
    if missing is None:
        pytest.skip("every known execution provider is available here")
    return tampered(lambda b, _: edit_manifest(b, lambda m: m["runtime"].update(
        providers=[missing, "CPUExecutionProvider"])), (missing, "not available"))(env)


case("ask-bundle-other-runtime", "HardwareMismatchError", tampered(
    lambda b, env: edit_manifest(b, lambda m: m["runtime"].update(engine="tensorrt")),
    ("{b}", "'tensorrt' runtime")))


# outputs and bench ------------------------------------------------------------------------------

def read_only_dir(env: Env, folder: Path) -> Path:
    """A folder nobody can create entries in; root ignores mode bits, so root gets chattr +i."""
    folder.mkdir()
    os.chmod(folder, 0o555)
    env.defer(lambda: os.chmod(folder, 0o755))
    if _writable(folder) and shutil.which("chattr"):
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            env.defer(lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True))
    if _writable(folder):
        pytest.skip("cannot make a read-only folder here (root without chattr +i)")
    return folder


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").mkdir()
    except OSError:
        return False
    (folder / ".probe").rmdir()
    return True


@case("export-out-not-empty", "OutputError")
def _(env):  # no --model: the default model (monkeypatched to the tiny one)
    out = env.tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return Call(["export", "--out", str(out)], (str(out), "not empty", "--overwrite"),
                unchanged=out)


@case("export-out-read-only", "OutputError")
def _(env):
    ro = read_only_dir(env, env.tmp / "ro")
    return Call(["export", "--model", str(env.model), "--out", str(ro / "bundle")], (str(ro),),
                absent=(ro / "bundle",))


@case("export-out-is-a-file", "OutputError")
def _(env):
    out = env.tmp / "out"
    out.write_text("a file, not a folder")
    return Call(["export", "--model", str(env.model), "--out", str(out)],
                (str(out), "not a folder"))


case("bench-bundle-missing", "BundleError", lambda env: Call(
    ["bench", env.tmp / "no-bundle", "--out", env.tmp / "bench-out"], ("no-bundle", "not found"),
    absent=(env.tmp / "bench-out",)))
case("bench-data-missing", "DatasetError", lambda env: Call(
    ["bench", env.export, "--data", env.tmp / "no-data", "--out", env.tmp / "bench-out"],
    ("no-data", "does not exist"), absent=(env.tmp / "bench-out",)))


@case("bench-list-bad-line", "DatasetError")
def _(env):
    data, out = env.tmp / "data", env.tmp / "bench-out"
    data.mkdir()
    (data / "bad.txt").write_text("group1/1/1.jpg\n")
    return Call(["bench", str(env.export), "--data", str(data), "--list", "bad.txt", "--out",
                 str(out)], ("bad.txt:1", "IMAGE ANNOTATION"), absent=(out,))


