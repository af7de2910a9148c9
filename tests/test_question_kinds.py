"""The question program: its meaning (scopes, orders, slots), its grammar, the generator of the
new kinds, and the two-pass answer (one confidence per defect whatever the question)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pcbedge.data.qa import NEW_KINDS, QuestionGenerator, vocabulary_corpus
from pcbedge.data.qa_kinds import (NEAREST, POINT_TEMPLATES, REGION_TEMPLATES, REGIONS, TOTAL,
                                   VERDICT, _margin_ok, add_noise)
from pcbedge.data.query import (NEAR_PX, SCOPES, Program, arrange, distance_to_box,
                                extract_numbers, in_scope, select)

W, H = 600, 300
D = [{"type": "short", "bbox": [10, 10, 30, 30]},       # top-left, small
     {"type": "open", "bbox": [500, 20, 560, 80]},      # top-right, large
     {"type": "spur", "bbox": [280, 200, 300, 220]},    # bottom, middle column
     {"type": "short", "bbox": [100, 250, 140, 290]}]   # bottom-left


def test_numbers_become_slots_in_order():
    text, nums = extract_numbers("nearest to x=412, y=230.5 within 40px")
    assert nums == [412.0, 230.5, 40.0]
    assert "<n_0>" in text and "<n_2>" in text and "412" not in text
    text, nums = extract_numbers(" ".join(str(i) for i in range(12)))
    assert len(nums) == 8 and text.strip().endswith("11")


@pytest.mark.parametrize("scope,want", [
    ("board", [0, 1, 2, 3]), ("top", [0, 1]), ("bottom", [2, 3]), ("left", [0, 2, 3]),
    ("right", [1]), ("top_left", [0]), ("top_right", [1]), ("bottom_left", [2, 3]),
    ("bottom_right", []), ("left_third", [0, 3]), ("middle_column", [2]),
    ("right_third", [1]), ("top_third", [0, 1]), ("middle_row", []), ("bottom_third", [2, 3])])
def test_named_scopes_follow_the_box_centre(scope, want):
    got = [i for i, d in enumerate(D) if in_scope(Program(scope=scope), d["bbox"], W, H)]
    assert got == want


def test_point_scopes_and_boxes():
    box = Program(scope="box", slots=(2, 3, 0, 1), numbers=(50, 0, 200, 320))  # corners swapped
    assert [d["type"] for d in select(box, D, W, H)] == ["short"]   # only the centre (120, 270)
    near = Program(scope="near", slots=(0, 1), numbers=(30 + NEAR_PX, 20))
    assert select(near, D, W, H) == [D[0]]                          # exactly NEAR_PX away
    within = Program(scope="within", slots=(0, 1, 2), numbers=(5, 300, 190))
    assert select(within, D, W, H) == []                            # 10 px from the spur
    within = Program(scope="within", slots=(0, 1, 2), numbers=(10, 300, 190))
    assert select(within, D, W, H) == [D[2]]
    assert distance_to_box([0, 0, 10, 10], 13, 14) == 5.0 and distance_to_box([0, 0, 9, 9], 3, 3) == 0


def test_orders():
    assert [d["bbox"][0] for d in arrange(Program(), D)] == [10, 500, 280, 100]  # rows of 32 px
    near = Program(scope="point", slots=(0, 1), order="nearest", numbers=(290, 150))
    assert arrange(near, D)[0] is D[2]
    assert arrange(Program(order="largest"), D)[0] is D[1]
    assert arrange(Program(order="smallest"), D)[0] in (D[0], D[2])
    typed = Program(types=("short",), order="largest")
    assert arrange(typed, select(typed, D, W, H)) == [D[3], D[0]]


def spec(num_regions=4):
    from pcbedge.families.pcbvlm.grammar import grammar_spec
    from pcbedge.families.pcbvlm.tokenizer import build_tokenizer
    tok = build_tokenizer(vocabulary_corpus(), num_regions)
    return grammar_spec(tok.get_vocab(with_added_tokens=True), num_regions, 0.05,
                        {"a": 1.0, "b": 0.0}), tok


def drive(sp, tokens, n_numbers):
    from pcbedge.families.pcbvlm.program import ProgramState
    st = ProgramState(sp, n_numbers)
    for t in tokens:
        st.advance(t)
    return st


def test_program_grammar_masks():
    from pcbedge.families.pcbvlm.program import ProgramState
    sp, _ = spec()
    p = sp["program"]
    st = ProgramState(sp, n_numbers=0)
    st.advance(sp["intents"]["where"])
    st.advance(sp["filters"]["short"])
    ok = np.flatnonzero(st.allowed())
    assert sp["filters"]["short"] not in ok and sp["filters"]["all"] not in ok
    assert sp["filters"]["open"] in ok and p["scopes"]["board"] in ok
    assert not {p["scopes"][s] for s in ("near", "point", "within", "box")} & set(ok)
    st.advance(p["scopes"]["board"])
    assert p["orders"]["nearest"] not in np.flatnonzero(st.allowed())       # no point
    st.advance(p["orders"]["largest"])
    assert list(np.flatnonzero(st.allowed())) == [sp["eos"]]
    with pytest.raises(ValueError):
        st.advance(p["slots"][0])
    st = drive(sp, [sp["intents"]["count"], sp["filters"]["all"], p["scopes"]["within"]], 3)
    assert list(np.flatnonzero(st.allowed())) == p["slots"][:3]


@pytest.mark.parametrize("n, scopes", [(2, {"point", "near"}), (3, {"within"}), (4, {"box"})])
def test_program_uses_every_number(n, scopes):
    """A question's numbers are its scope's arguments: with 2 / 3 / 4 numbers only the scopes
    taking exactly that many are allowed, and each number fills one slot, once."""
    sp, _ = spec()
    p = sp["program"]
    st = drive(sp, [sp["intents"]["describe"], sp["filters"]["all"]], n)
    assert set(np.flatnonzero(st.allowed())) == {p["scopes"][s] for s in scopes}
    st.advance(p["scopes"][sorted(scopes)[0]])
    taken = []
    for _ in range(n):
        ok = [p["slots"].index(int(t)) for t in np.flatnonzero(st.allowed())]
        assert sorted(ok) == sorted(set(range(n)) - set(taken))
        taken.append(ok[-1])
        st.advance(p["slots"][ok[-1]])
    assert st.phase == "order" and sorted(st.slots) == list(range(n))


@pytest.mark.parametrize("n", [1, 6])
def test_program_numbers_no_scope_takes_exactly(n):
    """One number, or more than a box's four: any scope taking no more than the question
    holds (the model's reading decides)."""
    sp, _ = spec()
    p = sp["program"]
    st = drive(sp, [sp["intents"]["describe"], sp["filters"]["all"]], n)
    want = {i for s, i in p["scopes"].items() if p["scope_slots"][s] <= n}
    assert set(np.flatnonzero(st.allowed())) == want


def board_state(sp, defects):
    from pcbedge.families.pcbvlm.grammar import DecodeState
    st = DecodeState(sp, np.ones(len(defects), np.float32))
    st.intent, st.filter, st.done = "describe", "all", True
    st.defects = [(d["type"], k, math.log(0.5 + 0.1 * k)) for k, d in enumerate(defects)]
    return st


def test_one_confidence_per_defect_whatever_the_question():
    """The answer's defects are board-pass regions: a region's confidence is the same under
    every program; a total is the all-types count; a verdict fails iff a region is admitted."""
    from pcbedge.families.pcbvlm.answer import compose
    sp, _ = spec()
    p = sp["program"]
    boxes = np.array([d["bbox"] for d in D], np.float32)
    bs = board_state(sp, D)
    programs = {
        "total": [sp["intents"]["count"], sp["filters"]["all"], p["scopes"]["board"],
                  p["orders"]["reading"], sp["eos"]],
        "verdict": [sp["intents"]["verdict"], sp["filters"]["all"], p["scopes"]["board"],
                    p["orders"]["reading"], sp["eos"]],
        "region": [sp["intents"]["describe"], sp["filters"]["all"], p["scopes"]["bottom"],
                   p["orders"]["reading"], sp["eos"]],
        "two": [sp["intents"]["where"], sp["filters"]["short"], sp["filters"]["spur"],
                p["scopes"]["board"], p["orders"]["reading"], sp["eos"]],
        "nearest": [sp["intents"]["where"], sp["filters"]["all"], p["scopes"]["point"],
                    p["slots"][0], p["slots"][1], p["orders"]["nearest"], sp["eos"]],
        "smallest_short": [sp["intents"]["where"], sp["filters"]["short"], p["scopes"]["board"],
                           p["orders"]["smallest"], sp["eos"]],
    }
    conf, answers = {}, {}
    for name, toks in programs.items():
        n = sum(t in p["slots"] for t in toks)   # a question holds the numbers it uses
        ans, trace = compose(sp, drive(sp, toks, n), [290.0, 150.0][:n], bs, boxes, list,
                             (W, H))
        answers[name] = ans
        assert ans["complete"] and trace[-1] == sp["eos"]
        for d in ans["defects"]:
            assert conf.setdefault(d["region"], d["confidence"]) == d["confidence"]
    assert answers["total"]["count"] == 4 and answers["verdict"]["verdict"] == "fail"
    assert answers["verdict"]["answer"].startswith("Fail: 4 defects")
    assert [d["region"] for d in answers["region"]["defects"]] == [2, 3]
    assert {d["type"] for d in answers["two"]["defects"]} == {"short", "spur"}
    assert answers["nearest"]["defects"][0]["region"] == 2
    assert answers["nearest"]["answer"].startswith("The nearest to (290, 150) is the spur")
    assert answers["smallest_short"]["defects"][0]["region"] == 0
    # a board with nothing: the verdict passes
    ans, _ = compose(sp, drive(sp, programs["verdict"], 0), [], board_state(sp, []),
                     boxes[:0], list, (W, H))
    assert ans["verdict"] == "pass" and ans["answer"].startswith("Pass")


def test_trace_cut_to_max_new_tokens():
    from pcbedge.families.pcbvlm.answer import compose
    sp, _ = spec()
    p = sp["program"]
    toks = [sp["intents"]["where"], sp["filters"]["all"], p["scopes"]["board"],
            p["orders"]["reading"], sp["eos"]]
    boxes = np.array([d["bbox"] for d in D], np.float32)
    ans, trace = compose(sp, drive(sp, toks, 0), [], board_state(sp, D), boxes, list, (W, H),
                         max_new_tokens=8)
    assert len(trace) == 8 and not ans["complete"] and ans["count"] == 2


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_generator_covers_every_new_kind_with_consistent_programs(split):
    g = QuestionGenerator(seed=3, split=split)
    seen, rng = set(), random.Random(0)
    for _ in range(400):
        kind = rng.choice(NEW_KINDS[:-1])
        qa = g.new_kind(kind, {"short", "open"}, D, (W, H))
        seen.add(qa.kind)
        prog = qa.meaning()
        _, numbers = extract_numbers(qa.question)
        assert len(prog.slots) == len(SCOPES[prog.scope])
        assert all(i < len(numbers) for i in prog.slots), qa
        assert tuple(numbers) == prog.numbers or not prog.slots
        if prog.order == "nearest":
            assert prog.point() is not None
    assert seen == set(NEW_KINDS[:-1])
    typo = g.typo({"short"}, D, (W, H))
    assert typo.kind == "typos" and typo.program is not None


def test_train_and_heldout_phrasings_are_disjoint():
    for table in (TOTAL, VERDICT, NEAREST):
        assert not set(table[0]) & set(table[1])
    for scope, (tr, ho) in REGIONS.items():
        assert not set(tr) & set(ho), scope
    assert not {t for _, t, _ in REGION_TEMPLATES[0]} & {t for _, t, _ in REGION_TEMPLATES[1]}
    assert not {t[1] for t in POINT_TEMPLATES[0]} & {t[1] for t in POINT_TEMPLATES[1]}


def test_heldout_region_phrases_recombine_known_words():
    # the rule the defect synonyms follow (docs/data.md): a held-out region phrase is never a
    # training phrase and reaches the model as known words, not spelt letter by letter
    from pcbedge.data.qa import vocabulary_corpus
    from pcbedge.families.pcbvlm.tokenizer import SUFFIXES, build_tokenizer
    tok = build_tokenizer(vocabulary_corpus(), 4)
    suffixes = {f"##{s}" for s in SUFFIXES}
    train = {p for tr, _ in REGIONS.values() for p in tr}
    for scope, (_, heldout) in REGIONS.items():
        for phrase in heldout:
            assert phrase not in train, (scope, phrase)
            pieces = tok.encode(phrase, add_special_tokens=False).tokens
            odd = [p for p in pieces if p.startswith("##") and p not in suffixes]
            assert "[UNK]" not in pieces and not odd, (scope, phrase, pieces)


def test_heldout_templates_of_every_kind_use_known_words():
    # the same rule for the held-out sentence frames (docs/data.md, since 2026-12-03): a frame
    # is new, its words are not; "overall", "altogether", "close", "plus" once reached the model
    # spelt letter by letter, and "how many faults does it have altogether?" was read wrong
    import re

    from pcbedge.data.qa import TEMPLATES
    from pcbedge.data.qa_kinds import EXTREME, TWO_TYPES
    from pcbedge.families.pcbvlm.tokenizer import SUFFIXES, build_tokenizer
    tok = build_tokenizer(vocabulary_corpus(), 4)
    suffixes = {f"##{s}" for s in SUFFIXES}
    frames = [t for _tr, ho in TEMPLATES.values() for t in ho] + list(TOTAL[1])
    frames += list(VERDICT[1]) + list(NEAREST[1]) + [t[1] for t in REGION_TEMPLATES[1]]
    frames += [t[1] for t in POINT_TEMPLATES[1]] + [t for _i, t in TWO_TYPES[1]]
    frames += [t for _o, t in EXTREME[1]]
    corpus = "\n".join(vocabulary_corpus()).lower()
    for frame in frames:
        assert frame.lower() not in corpus, frame
        for word in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", frame.lower())):
            pieces = tok.encode(word, add_special_tokens=False).tokens
            odd = [p for p in pieces if p.startswith("##") and p not in suffixes]
            assert "[UNK]" not in pieces and not odd, (frame, word, pieces)


def test_noise_keeps_numbers_and_changes_letters():
    rng = random.Random(0)
    changed = 0
    for _ in range(50):
        q = "What's the defect nearest to x=412, y=230?"
        n = add_noise(q, rng, 2)
        assert extract_numbers(n)[1] == [412.0, 230.0]
        changed += n.lower().rstrip("?") != q.lower().rstrip("?")
    assert changed > 40


def test_well_posed_questions_keep_a_margin():
    g = QuestionGenerator(seed=5, split="heldout")
    for _ in range(50):
        qa = g.well_posed("region", {"short"}, D, (W, H))
        assert _margin_ok(qa.meaning(), D, (W, H), 8.0) or qa.meaning().scope == "board"


def test_training_batches_of_programs_and_board_passes():
    """Program batches label only the program (after the forced ``<prog>``); board batches are
    the describe-all board pass with region targets."""
    import torch

    from pcbedge.families.pcbvlm.model.train import FinetuneConfig
    from pcbedge.families.pcbvlm.model.train_lm import IGNORE, make_batch, program_ids
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm_model
    model = tiny_pcbvlm_model()
    sp = model.spec
    K = sp["num_regions"]
    with torch.no_grad():
        c32, boxes, scores, raw, _, _ = model.vision(torch.rand(1, 3, 128, 128))
    match = np.full(K, -1)
    match[:2] = [1, 3]
    items = [{"c32": c32[0], "raw": raw[0], "match": match}]
    fc = FinetuneConfig(batch_b=6)
    gen = QuestionGenerator(seed=0, split="train", fillers=True)
    ids, lab, *_ = make_batch(model, items, random.Random(0), gen, fc, 40, board=False)
    for row_ids, row_lab in zip(ids.tolist(), lab.tolist()):
        labels = [t for t in row_lab if t != IGNORE]
        assert labels[-1] == sp["eos"] and all(t < sp["region_offset"] for t in labels)
        start = row_lab.index(labels[0])
        assert row_ids[start] == sp["program"]["prog"]          # the forced mode token
    ids, lab, _, _, targets = make_batch(model, items, random.Random(1), gen, fc, 40, board=True)
    for row_lab in lab.tolist():
        labels = [t for t in row_lab if t != IGNORE]
        assert labels[:2] == [sp["intents"]["describe"], sp["filters"]["all"]]
        assert sorted(t - sp["region_offset"] for t in labels[2:-1:2]) == [0, 1]
    p = Program("count", ("short", "spur"), "within", (2, 0, 1), "reading", (1.0, 2.0, 3.0))
    assert program_ids(sp, p) == [
        sp["intents"]["count"], sp["filters"]["short"], sp["filters"]["spur"],
        sp["program"]["scopes"]["within"], *[sp["program"]["slots"][i] for i in (2, 0, 1)],
        sp["program"]["orders"]["reading"], sp["eos"]]
