"""The catalogue of bad inputs (docs/bad-inputs.md), each case run through the real CLI.

Every case asserts: the exit code is the error type's own code (docs/errors.md), the message
names the bad value, no traceback is printed, and no half-written output is left behind.
The inputs that must *work* (colour modes, EXIF rotation, other languages) are at the end.
A test keeps the catalogue and docs/bad-inputs.md in sync.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pcbedge import api
from pcbedge.cli import cli
from pcbedge.errors import ALL_ERRORS
from pcbedge.testing import tiny_bundle, write_pair_images

REPO = Path(__file__).resolve().parents[1]
SAMPLE_JPG = REPO / "pcbedge/data/sample/group00041/00041/00041000_test.jpg"
DOC = REPO / "docs" / "bad-inputs.md"
EXIT_CODES = {e.__name__: e.exit_code for e in ALL_ERRORS} | {"UsageError": 2, "(none)": 0}
INTENTS = ("where", "count", "exists", "describe", "unsupported")
Q = "where are the shorts?"


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model folder, its FP32 export), shared with the other test modules."""
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")


@pytest.fixture(scope="session")
def built(tiny, tmp_path_factory) -> Path:
    """The tiny export built for x86-cpu (INT8 vision, pruning): a bundle with a target block."""
    from pcbedge.recipes.build import build_bundle
    return build_bundle("x86-cpu", tiny[1], tmp_path_factory.mktemp("bad-inputs") / "x86-cpu",
                        progress=False)


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


@pytest.fixture
def env(tiny, built, tmp_path, monkeypatch, request) -> Env:
    # a CliRunner command without --model / BUNDLE must never load the big reference model
    monkeypatch.setattr(api, "DEFAULT_MODEL", tiny[0])
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny[0], tiny[1], built, request.addfinalizer)


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
    build(env, export=env.built), (str(env.built), "not an FP32 export"),
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


@pytest.mark.parametrize("cid", [
    pytest.param(c.id, marks=pytest.mark.xfail(strict=True, reason=c.xfail) if c.xfail else ())
    for c in CASES.values()])
def test_bad_input(cid, env):
    c = CASES[cid]
    call = c.make(env)
    before = snapshot(call.unchanged) if call.unchanged else None
    code, out = invoke(call, env.tmp)
    assert code == EXIT_CODES[c.error], f"{cid}: exit {code}, want {c.error}\n{out}"
    assert "Traceback" not in out
    if c.error != "UsageError":
        assert "error: " in out and "fix: " in out, out
    for fragment in call.names:
        assert fragment in out, f"{cid}: {fragment!r} not in the message:\n{out}"
    for path in call.absent:
        assert not path.exists(), f"{cid}: {path} was left behind"
        assert not leftovers(path), f"{cid}: left {leftovers(path)}"
    if call.unchanged:
        assert snapshot(call.unchanged) == before
        assert not leftovers(call.unchanged)


# --- inputs that must work ----------------------------------------------------------------------

def ask_json(env: Env, test: Path, temp: Path, question: str = Q) -> dict:
    result = CliRunner().invoke(cli, ask(env, test, temp, question, "--json"))
    assert result.exit_code == 0 and result.exception is None, result.output
    ans = json.loads(result.stdout)
    assert ans["intent"] in INTENTS and ans["count"] == len(ans["defects"])
    return ans


def test_gray_rgb_and_16bit_png_work_and_agree(env):
    """ask-grayscale-png, ask-rgb-png, ask-16bit-png: one board in three encodings."""
    from pcbedge.data.preprocess import read_gray
    test, temp = env.pair()
    answers = {}
    for mode in ("L", "RGB", "I;16"):
        paths = []
        for src in (test, temp):
            gray = np.asarray(Image.open(src))
            img = {"L": Image.fromarray(gray), "RGB": Image.fromarray(gray).convert("RGB"),
                   "I;16": Image.fromarray(gray.astype(np.uint16) * 257)}[mode]
            paths.append(env.tmp / f"{src.stem}_{mode.replace(';', '')}.png")
            img.save(paths[-1])
            assert np.array_equal(read_gray(paths[-1]), gray)
        with Image.open(paths[0]) as im:
            assert im.mode.startswith("I") if mode == "I;16" else im.mode == mode
        answers[mode] = ask_json(env, *paths)
    assert answers["L"]["defects"] == answers["RGB"]["defects"] == answers["I;16"]["defects"]


def test_exif_rotated_photo_works_in_the_rotated_frame(env):
    """ask-exif-rotated-jpeg: stored 200x150 with EXIF orientation 6, displayed 150x200."""
    test, _ = env.pair()
    stored = Image.open(test)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = env.tmp / "rot_test.jpg"
    stored.save(rotated, exif=exif.tobytes(), quality=95)
    upright_temp = env.tmp / "rot_temp.png"  # the template as displayed: 150 wide, 200 high
    Image.new("L", (150, 200), 40).save(upright_temp)
    # without the EXIF rotation the pair would be 200x150 vs 150x200 and fail with exit 11
    ans = ask_json(env, rotated, upright_temp)
    for d in ans["defects"]:
        x1, y1, x2, y2 = d["bbox"]
        assert 0 <= x1 <= x2 <= 150 and 0 <= y1 <= y2 <= 200, d


@pytest.mark.parametrize("question", [
    "Wo ist der Kurzschluss?", "短路在哪里？", "¿Cuántos cortocircuitos hay?",
    "<eos> <r_3> [PAD] <q_count>"], ids=["german", "chinese", "spanish", "answer-tokens"])
def test_other_languages_get_a_well_formed_answer(env, question):
    """ask-foreign-language-question, ask-answer-tokens-in-question."""
    ans = ask_json(env, *env.pair(), question)
    if ans["intent"] == "unsupported":
        assert ans["answer"].startswith("I can only report")


# --- the catalogue and its documentation agree --------------------------------------------------

WORKING = ("ask-grayscale-png", "ask-rgb-png", "ask-16bit-png", "ask-exif-rotated-jpeg",
           "ask-foreign-language-question", "ask-answer-tokens-in-question")


def test_catalogue_matches_the_doc():
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|[^|]*\|\s*`?([A-Za-z()]+)`?\s*\|\s*(\d+)\s*\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), int(m.group(3)))
    want = {c.id: (c.error, EXIT_CODES[c.error]) for c in CASES.values()}
    want |= {cid: ("(none)", 0) for cid in WORKING}
    assert rows == want
    assert len(CASES) >= 25
