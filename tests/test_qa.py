"""Question generation: coverage, negatives, paraphrases, the train/held-out split, determinism."""
from __future__ import annotations

import re
from collections import defaultdict

import pytest

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.data.qa import (KINDS, OFF_TOPIC, SYNONYMS, TEMPLATES, UNSUPPORTED_TYPES,
                             QuestionGenerator, plural, vocabulary_corpus)

SPLITS = ("train", "heldout")
TYPED_KINDS = ("where", "count", "exists")


def _phrases(split: str) -> set[str]:
    i = SPLITS.index(split)
    return {p for t in DEFECT_TYPES for p in SYNONYMS[t][i]}


def _mentions(text: str, phrases: set[str]) -> set[str]:
    """The phrases (singular or plural) that occur in ``text`` as whole words."""
    text = text.lower()
    found = set()
    for p in phrases:
        for form in {p, plural(p)}:
            if re.search(r"(?<![\w-])" + re.escape(form) + r"(?![\w-])", text):
                found.add(p)
    return found


def _samples(split: str, n: int, seed: int = 0, present=None) -> list:
    g = QuestionGenerator(seed=seed, split=split)
    boards = [set(DEFECT_TYPES[:k]) for k in range(len(DEFECT_TYPES) + 1)]
    return [g.sample(present if present is not None else boards[i % len(boards)])
            for i in range(n)]


# ---------------------------------------------------------------- coverage and labels


@pytest.mark.parametrize("split", SPLITS)
def test_every_kind_and_type_is_generated(split):
    qas = _samples(split, 1500)
    assert {q.kind for q in qas} == set(KINDS)
    for kind in TYPED_KINDS:
        assert {q.filter for q in qas if q.kind == kind} == set(DEFECT_TYPES), kind


@pytest.mark.parametrize("split", SPLITS)
def test_labels_are_consistent(split):
    own = _phrases(split)
    for q in _samples(split, 1000):
        assert q.kind in KINDS and q.question.strip() and "{" not in q.question
        if q.kind in TYPED_KINDS:
            assert q.filter in DEFECT_TYPES
            if re.search(r"[A-Z]{2}", q.question):
                continue  # an upper-cased phrase: see test_uppercase_phrase_is_pluralised
            i = SPLITS.index(split)
            assert _mentions(q.question, set(SYNONYMS[q.filter][i])), q
        else:
            assert q.filter is None, q
            # a describe / unsupported question names no supported defect type
            assert not _mentions(q.question, own), q


def test_negatives_are_asked():
    qas = _samples("train", 600, present={"short"})
    asked = {q.filter for q in qas if q.kind in TYPED_KINDS}
    assert asked == set(DEFECT_TYPES)  # the five absent types too
    negatives = [q for q in qas if q.kind in TYPED_KINDS and q.filter != "short"]
    positives = [q for q in qas if q.kind in TYPED_KINDS and q.filter == "short"]
    assert len(negatives) > 0.2 * len(positives)
    assert all(q.filter is None for q in qas if q.kind == "describe")


def test_board_without_defects_gets_only_negatives():
    qas = _samples("train", 300, present=set())
    assert {q.filter for q in qas if q.kind in TYPED_KINDS} == set(DEFECT_TYPES)


@pytest.mark.parametrize("present", [set(), {"short"}, set(DEFECT_TYPES)])
def test_eval_set_per_board(present):
    qas = QuestionGenerator(seed=3).for_board_eval(present)
    assert qas[0].kind == "describe" and qas[0].filter is None
    typed = qas[1:]
    n_picks = (1 if present else 0) + (1 if set(DEFECT_TYPES) - present else 0)
    assert len(typed) == 3 * n_picks
    assert [q.kind for q in typed] == list(TYPED_KINDS) * n_picks
    if present and set(DEFECT_TYPES) - present:
        assert typed[0].filter in present and typed[3].filter not in present


def test_uppercase_phrase_is_pluralised():
    for q in _samples("train", 3000):
        if q.kind in TYPED_KINDS and re.search(r"[A-Z]{2}", q.question):
            assert _mentions(q.question, set(SYNONYMS[q.filter][0])), q


def test_plural():
    assert plural("short") == "shorts"
    assert plural("discontinuity") == "discontinuities"
    assert plural("copper splash") == "copper splashes"
    assert plural("hole in the copper") == "holes in the copper"
    assert plural("shorted traces") == "shorted traces"


# ---------------------------------------------------------------- paraphrases


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", KINDS)
def test_paraphrase_diversity(split, kind):
    g = QuestionGenerator(seed=1, split=split)
    if kind in TYPED_KINDS:
        qs = {g.typed(kind, DEFECT_TYPES[i % 6]).question for i in range(200)}
    elif kind == "describe":
        qs = {g.describe().question for _ in range(200)}
    else:
        qs = {g.unsupported().question for _ in range(200)}
    assert len(qs) >= 5, (kind, split, qs)


def test_sampled_paraphrase_diversity():
    by_kind = defaultdict(set)
    for q in _samples("train", 600):
        by_kind[q.kind].add(q.question)
    assert all(len(by_kind[k]) >= 5 for k in KINDS), {k: len(v) for k, v in by_kind.items()}


# ---------------------------------------------------------------- train vs held-out phrasing


def test_synonym_and_template_lists_are_disjoint():
    for t in DEFECT_TYPES:
        tr, ho = SYNONYMS[t]
        assert ho and not set(tr) & set(ho), t
    for kind, (tr, ho) in TEMPLATES.items():
        assert ho and not set(tr) & set(ho), kind


def test_heldout_questions_never_equal_train_questions():
    # off-topic questions are shared on purpose: they carry no phrasing to hold out
    off_topic = {o + "?" for o in OFF_TOPIC}
    train = {q.question.lower() for q in _samples("train", 2000)}
    heldout = {q.question.lower() for q in _samples("heldout", 2000)}
    assert not (train & heldout) - off_topic


def test_no_heldout_synonym_in_train_questions():
    heldout = _phrases("heldout")
    leaks = {p for q in _samples("train", 2000) for p in _mentions(q.question, heldout)}
    assert not leaks


def test_heldout_phrases_are_new_combinations_of_known_words():
    # the held-out synonyms recombine training words ("severed line": "severed trace" and
    # "broken line" are trained) or inflect them ("nicked" -> "nick ##ed"); never a whole
    # training phrase, never a word the tokenizer can only spell letter by letter
    from pcbedge.families.pcbvlm.tokenizer import SUFFIXES, build_tokenizer
    tok = build_tokenizer(vocabulary_corpus(), 4)
    suffixes = {f"##{s}" for s in SUFFIXES}
    train = {p for t in DEFECT_TYPES for p in SYNONYMS[t][0]}
    for t in DEFECT_TYPES:
        for phrase in SYNONYMS[t][1]:
            assert phrase not in train, phrase
            pieces = tok.encode(phrase, add_special_tokens=False).tokens
            odd = [p for p in pieces if p.startswith("##") and p not in suffixes]
            assert "[UNK]" not in pieces and not odd, (phrase, pieces)


def test_vocabulary_corpus_holds_no_heldout_synonym():
    heldout = _phrases("heldout")
    leaks = {p for line in vocabulary_corpus() for p in _mentions(line, heldout)}
    assert not leaks


def test_vocabulary_corpus_holds_no_heldout_template():
    corpus = "\n".join(vocabulary_corpus()).lower()
    for kind, (_tr, ho) in TEMPLATES.items():
        for tpl in ho:
            fixed = max(re.split(r"\{xs?\}", tpl), key=len).strip(" ?.")
            assert fixed not in corpus, (kind, tpl)
    assert all(t in corpus for t in UNSUPPORTED_TYPES)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_same_sequence(split):
    assert _samples(split, 300, seed=7) == _samples(split, 300, seed=7)
    a = QuestionGenerator(seed=7, split=split).for_board_eval({"open", "spur"})
    b = QuestionGenerator(seed=7, split=split).for_board_eval({"open", "spur"})
    assert a == b


@pytest.mark.parametrize("split", SPLITS)
def test_different_seed_different_sequence(split):
    assert _samples(split, 300, seed=7) != _samples(split, 300, seed=8)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be"):
        QuestionGenerator(split="test")


def test_unknown_word_insertion():
    """One made-up word of 4-7 letters goes between two words; the rest of the question, its
    numbers and their order are kept; a draw that is a known word is rejected."""
    import random
    from pcbedge.data.qa_kinds import insert_unknown_word
    rng = random.Random(0)
    q = "what's the defect nearest to x=412, y=230?"
    for _ in range(200):
        out = insert_unknown_word(q, rng)
        words = out.split(" ")
        assert len(words) == len(q.split(" ")) + 1
        new = [w for w in words if w not in q.split(" ")]
        assert len(new) == 1 and new[0].isalpha() and new[0].islower() and 4 <= len(new[0]) <= 7
        assert [w for w in words if w != new[0]] == q.split(" ")
    # every draw known: the question is returned unchanged
    assert insert_unknown_word(q, rng, is_known=lambda w: True) == q
