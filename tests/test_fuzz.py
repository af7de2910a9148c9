"""Fuzzing (hypothesis) of the three places where untrusted input meets the runtime.

* the question path: any question into a tiny PcbVlmOnnxRunner's ``answer`` gives a
  well-formed answer or a QuestionError, nothing else;
* the constrained decoder: ``DecodeState`` driven by random logits always ends in a well-formed
  answer sequence within the grammar's own length bound;
* the image loader: a mutated image file gives a grayscale array or an InputImageError.

Each property runs ``PCBEDGE_FUZZ_EXAMPLES`` cases (default 60); the count is printed and kept
as the test's ``fuzz_cases`` property (``--junitxml``).
"""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pcbedge.data.preprocess import MIN_SIDE, PairMeta, read_gray
from pcbedge.runtime.protocol import Prepared
from pcbedge.errors import InputImageError, QuestionError
from pcbedge.families.pcbvlm.grammar import DEFECT_TYPES, INTENTS, DecodeState, board_defects
from pcbedge.families.pcbvlm.program import ProgramState
from pcbedge.runtime import MAX_QUESTION_CHARS
from pcbedge.testing import random_pair_input, tiny_bundle

EXAMPLES = int(os.environ.get("PCBEDGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
SAMPLE_JPG = (Path(__file__).resolve().parents[1]
              / "pcbedge/data/sample/group00041/00041/00041000_test.jpg")


def _report(record_property, name: str, n: int) -> None:
    print(f"\n{name}: {n} fuzz cases")
    record_property("fuzz_cases", n)
    assert n >= min(EXAMPLES, 10), f"only {n} cases ran"


# --- the question path --------------------------------------------------------------------------

ANSWER_TOKENS = ["<eos>", "<bos>", "<sep>", "[PAD]", "[UNK]", "<r_0>", "<r_3>", "<r_7>", "<r_99>",
                 "<q_where>", "<q_unsupported>", "<f_all>", "<t_short>", "##s", "<", ">", "[", "]"]
WORDS = ["where", "how", "many", "shorts", "open", "spur", "pin-hole", "mousebite", "any", "?",
         "copper", "defects", "🔥", "短路", "Kurzschluß", "\u200b", "\x00", "\x1b[31m", "\r\n"]
_PLAUSIBLE = (  # mostly valid text: these reach the tokenizer and the decoder
    st.text(min_size=1),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40),  # controls
    st.lists(st.sampled_from(ANSWER_TOKENS + WORDS), min_size=1, max_size=40).map(" ".join),
    st.lists(st.sampled_from(ANSWER_TOKENS + WORDS), min_size=1, max_size=40).map("".join),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=5), st.integers(50, 700)),
)
QUESTIONS = st.one_of(
    *_PLAUSIBLE, *_PLAUSIBLE,
    st.text(st.characters(categories=["Cs", "Cc", "Zs"]), max_size=8),  # lone surrogates
    st.sampled_from(["", " ", "\t\n", "x" * MAX_QUESTION_CHARS, "x" * (MAX_QUESTION_CHARS + 1)]),
    st.one_of(st.none(), st.integers(), st.binary(max_size=16), st.lists(st.text(), max_size=2)),
)
ORIG = (200, 150)   # the original image size the boxes map back to


def question_is_bad(q) -> bool:
    if not isinstance(q, str) or not q.strip() or len(q) > MAX_QUESTION_CHARS:
        return True
    try:
        q.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    return PcbVlmOnnxRunner(tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1])


def check_answer(ans: dict, runner, enc, max_new_tokens: int) -> None:
    """The answer dict is well-formed and its ``raw`` text parses back to the same answer."""
    scores = enc.outputs["region_scores"][0]
    floor = runner.grammar["min_region_score"]
    assert ans["intent"] in INTENTS
    assert ans["count"] == len(ans["defects"])
    assert 1 <= len(ans["token_ids"]) <= max_new_tokens
    regions = [d["region"] for d in ans["defects"]]
    assert len(regions) == len(set(regions))
    for d in ans["defects"]:
        x1, y1, x2, y2 = d["bbox"]
        assert 0 <= x1 <= x2 <= ORIG[0] and 0 <= y1 <= y2 <= ORIG[1], d
        assert 0.0 <= d["confidence"] <= 1.0 and d["type"] in DEFECT_TYPES
        assert scores[d["region"]] >= floor
    assert runner.tokenizer.encode(ans["raw"], add_special_tokens=False).ids == ans["token_ids"]
    replay_answer(runner.grammar, ans, regions)
    if ans["intent"] == "unsupported" and ans["complete"]:
        assert ans["answer"].startswith("I can only answer")


def replay_answer(spec: dict, ans: dict, regions: list[int]) -> None:
    """The trace is a program under the program grammar, then (region, type) pairs naming the
    reported defects in order, then ``<eos>`` when complete."""
    trace = list(ans["token_ids"])
    prog = ProgramState(spec, n_numbers=8)
    i = 0
    while i < len(trace) and prog.phase not in ("end", "done"):
        assert prog.allowed()[trace[i]], f"token {trace[i]} breaks the program grammar"
        prog.advance(trace[i])
        i += 1
    rest = trace[i:]
    if prog.done:                      # unsupported: the program is the whole answer
        assert not rest and not regions
        return
    if ans["complete"]:
        assert rest and rest[-1] == spec["eos"]
        rest = rest[:-1]
    pairs = [(rest[j], rest[j + 1]) for j in range(0, len(rest) - 1, 2)]
    assert [r - spec["region_offset"] for r, _ in pairs] == regions
    assert [spec["types"][d["type"]] for d in ans["defects"]] == [t for _, t in pairs]


def test_any_question_gives_an_answer_or_a_question_error(runner, record_property):
    meta = PairMeta(orig_w=ORIG[0], orig_h=ORIG[1], input_size=runner.input_size)
    encodings = [runner.encode(Prepared(random_pair_input(runner.input_size, seed=s), meta))
                 for s in range(4)]
    seen = {"answers": 0, "question_errors": 0}

    @FUZZ
    @given(q=QUESTIONS, image=st.integers(0, len(encodings) - 1),
           max_new_tokens=st.integers(1, 64))
    def fuzz(q, image, max_new_tokens):
        enc = encodings[image]
        try:
            ans = runner.answer(enc, q, max_new_tokens=max_new_tokens)
        except QuestionError:
            assert question_is_bad(q), f"QuestionError for the good question {q!r}"
            seen["question_errors"] += 1
            return
        assert not question_is_bad(q), f"no QuestionError for {q!r}"
        check_answer(ans, runner, enc, max_new_tokens)
        seen["answers"] += 1

    fuzz()
    print(f"\nquestion path: {seen}")
    _report(record_property, "question path", sum(seen.values()))


# --- the constrained decoder --------------------------------------------------------------------

@lru_cache(maxsize=None)
def spec_for(num_regions: int) -> dict:
    from pcbedge.data.qa import vocabulary_corpus
    from pcbedge.families.pcbvlm.grammar import grammar_spec
    from pcbedge.families.pcbvlm.tokenizer import build_tokenizer
    tok = build_tokenizer(vocabulary_corpus(), num_regions)
    return grammar_spec(tok.get_vocab(with_added_tokens=True), num_regions, 0.5,
                        {"a": 1.3, "b": -0.2})


def bias_for(spec: dict, kind: str, size: int) -> np.ndarray:
    """Push the logits towards one part of the language (longest / shortest answers)."""
    b = np.zeros(size)
    ids = {"none": [], "eos": [spec["eos"]], "unsupported": [spec["intents"]["unsupported"]],
           "types": list(spec["types"].values()),
           "regions": list(range(spec["region_offset"], size))}[kind]
    b[ids] = 50.0
    return b


def drive(spec: dict, scores: np.ndarray, seed: int, scale: float, bias: str):
    """Decode until done with fresh random logits each step; checks every step's mask."""
    state = DecodeState(spec, scores)
    size = state.vocab_size()
    limit = 3 + 2 * int(np.sum(scores >= spec["min_region_score"]))  # the grammar's longest
    rng, b = np.random.default_rng(seed), bias_for(spec, bias, size)
    toks = []
    while not state.done:
        assert len(toks) < limit, f"no end after {toks}"
        mask = state.allowed()
        assert mask.shape == (size,) and mask.any(), f"nothing allowed after {toks}"
        logits = (rng.standard_normal(size) * scale + b).astype(np.float32)
        toks.append(state.step(logits))
        assert mask[toks[-1]]
    return toks, state


def check_sequence(spec: dict, scores: np.ndarray, toks: list[int], state) -> None:
    inv = {v: k for k, v in spec["intents"].items()}
    assert toks[0] in inv and toks[-1] == spec["eos"]
    if inv[toks[0]] == "unsupported":
        assert toks == [toks[0], spec["eos"]]
        return
    filt = {v: k for k, v in spec["filters"].items()}[toks[1]]
    types = {v: k for k, v in spec["types"].items()}
    body = toks[2:-1]
    assert len(body) % 2 == 0
    regions = [r - spec["region_offset"] for r in body[0::2]]  # REGION TYPE pairs
    assert all(types[t] == filt or filt == "all" for t in body[1::2])
    assert all(0 <= k < len(scores) and scores[k] >= spec["min_region_score"] for k in regions)
    assert len(set(regions)) == len(regions), regions  # each proposal at most once
    defects = board_defects(state, np.tile([0.0, 0.0, 8.0, 8.0], (len(scores), 1)), list)
    assert len(defects) == len(regions) and state.done
    assert all(0.0 <= d["confidence"] <= 1.0 for d in defects)


def test_random_logits_always_decode_to_a_well_formed_answer(record_property):
    count = {"n": 0}

    @FUZZ
    @given(scores=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
           floor=st.sampled_from([0.0, 0.05, 0.5, 0.999, 1.0]), seed=st.integers(0, 2**32 - 1),
           scale=st.sampled_from([1e-6, 1.0, 30.0, 1e4, 1e30]),
           bias=st.sampled_from(["none", "eos", "unsupported", "types", "regions"]))
    def fuzz(scores, floor, seed, scale, bias):
        scores = np.asarray(scores, dtype=np.float32)
        spec = {**spec_for(len(scores)), "min_region_score": floor}
        toks, state = drive(spec, scores, seed, scale, bias)
        check_sequence(spec, scores, toks, state)
        count["n"] += 1

    fuzz()
    _report(record_property, "grammar", count["n"])


def test_random_logits_always_decode_to_a_well_formed_program(record_property):
    """The program grammar under random logits: it ends within its longest form, every scope
    takes exactly its slots (only slots the question has), nearest only with a point."""
    from pcbedge.data.query import POINT_SCOPES, SCOPES
    count = {"n": 0}

    @FUZZ
    @given(n_numbers=st.integers(0, 8), seed=st.integers(0, 2**32 - 1),
           scale=st.sampled_from([1e-6, 1.0, 30.0, 1e30]))
    def fuzz(n_numbers, seed, scale):
        spec = spec_for(4)
        state = ProgramState(spec, n_numbers)
        rng = np.random.default_rng(seed)
        for _ in range(1 + 7 + 1 + 4 + 1 + 1):
            if state.done:
                break
            state.step((rng.standard_normal(state.vocab_size()) * scale).astype(np.float32))
        assert state.done
        p = state.program([float(i) for i in range(n_numbers)])
        if p.intent != "unsupported":
            assert len(p.slots) == len(SCOPES[p.scope]) <= n_numbers
            assert all(0 <= i < n_numbers for i in p.slots)
            assert len(set(p.types)) == len(p.types)
            assert p.order != "nearest" or p.scope in POINT_SCOPES
        count["n"] += 1

    fuzz()
    _report(record_property, "program grammar", count["n"])


@pytest.mark.parametrize("fill", [-np.inf, np.inf, np.nan])
def test_non_finite_logits_still_decode(fill):
    spec = spec_for(8)
    state = DecodeState(spec, np.linspace(0.0, 1.0, 8))
    logits = np.full(state.vocab_size(), fill, dtype=np.float32)
    for _ in range(64):
        if state.done:
            break
        assert state.allowed()[state.step(logits)]
    assert all(np.isfinite(lp) for _, _, lp in state.defects)


# --- the image loader ---------------------------------------------------------------------------

def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=None)
def base_files() -> dict[str, bytes]:
    gray = np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"sample.jpg": SAMPLE_JPG.read_bytes(),
            "gray.png": _encoded(Image.fromarray(gray), "PNG"),
            "16bit.png": _encoded(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
            "exif.jpg": _encoded(Image.fromarray(gray).convert("RGB"), "JPEG",
                                 exif=exif.tobytes()),
            "rgba.webp": _encoded(Image.fromarray(gray).convert("RGBA"), "WEBP")}


POSITION = st.one_of(st.integers(0, 64), st.integers(0, 2**31))   # headers get their share
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite"), POSITION, st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        at = op[1] % (len(buf) + 1)
        if op[0] == "flip" and at < len(buf):
            buf[at] ^= 1 << op[2]
        elif op[0] == "truncate":
            del buf[at:]
        elif op[0] == "insert":
            buf[at:at] = op[2]
        elif op[0] == "overwrite":
            buf[at:at + len(op[2])] = op[2]
    return bytes(buf)


def test_mutated_image_files_give_an_array_or_an_input_image_error(tmp_path, record_property):
    seen = {"decoded": 0, "input_image_errors": 0}
    path = tmp_path / "board_test.img"

    @FUZZ
    @given(base=st.sampled_from(sorted(base_files())), ops=st.lists(MUTATION, min_size=1,
                                                                    max_size=5))
    def fuzz(base, ops):
        path.write_bytes(mutate(base_files()[base], ops))
        try:
            arr = read_gray(path)
        except InputImageError as e:
            assert str(path) in str(e)
            seen["input_image_errors"] += 1
            return
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 2
        assert min(arr.shape) >= MIN_SIDE
        seen["decoded"] += 1

    fuzz()
    print(f"\nimage loader: {seen}")
    _report(record_property, "image loader", sum(seen.values()))
