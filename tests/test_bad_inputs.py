"""The catalogue of bad inputs (docs/bad-inputs.md), each case run through the real CLI.

Every case asserts: the exit code is the error type's own code (docs/errors.md), the message
names the bad value, no traceback is printed, and no half-written output is left behind.
The inputs that must *work* (colour modes, EXIF rotation, other languages) are at the end.
A test keeps the catalogue and docs/bad-inputs.md in sync.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pcbedge import api
from pcbedge.cli import cli
from pcbedge.testing import tiny_bundle

from badinputs.harness import (CASES, DOC, EXIT_CODES, INTENTS, Q, Env, ask, invoke, leftovers,
                               snapshot)

# every cases_*.py beside the harness registers its cases on import
for _mod in sorted((Path(__file__).parent / "badinputs").glob("cases_*.py")):
    importlib.import_module(f"badinputs.{_mod.stem}")


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


@pytest.fixture
def env(tiny, built, tmp_path, monkeypatch, request) -> Env:
    # a CliRunner command without --model / BUNDLE must never load the big reference model
    monkeypatch.setattr(api, "DEFAULT_MODEL", tiny[0])
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny[0], tiny[1], built, request.addfinalizer)


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
