"""The reference tokenizer's spelling repair: a misspelt word becomes the one known word it is
nearest to, and nothing else changes."""
from __future__ import annotations

import random
import re

import pytest

from pcbedge.data.qa import vocabulary_corpus
from pcbedge.data.qa_kinds import add_noise
from pcbedge.families.pcbvlm.tokenizer import (_edits, build_tokenizer, encode_question_numbers,
                                               spelling_fixed)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocabulary_corpus(), 8)


@pytest.mark.parametrize("a,b,d", [("teh", "the", 1), ("circut", "circuit", 1), ("hlaf", "half", 1),
                                   ("spurius", "spurious", 1), ("abc", "xyz", 3), ("", "ab", 2),
                                   ("mnay", "many", 1), ("shrot", "short", 1)])
def test_edit_distance_by_hand(a, b, d):
    assert _edits(a, b, 3) == d
    assert _edits(a, b, d - 1) == d if d > 0 else True   # past the limit: limit + 1


@pytest.mark.parametrize("typed,meant", [
    ("where's teh short circut?", "where's the short circuit?"),
    ("how mnay opens in the uper left?", "how many opens in the upper left?"),
    ("any spurius copper?", "any spurious copper?"),
    ("whihc defects lie in the lower hlaf", "which defects lie in the lower half"),
])
def test_typos_are_repaired(tok, typed, meant):
    assert spelling_fixed(tok, typed) == meant


@pytest.mark.parametrize("text", [
    "how many defects does the right-most third have?",   # "most" is not "cost"
    "shortings near the connector",                       # known word + suffix; unknown word
    "any defect within 40 px of (120, 300)?",             # numbers untouched
    "list every defect.",
])
def test_known_and_unknown_words_are_left_alone(tok, text):
    assert spelling_fixed(tok, text) == text


def test_repair_only_moves_towards_known_words(tok):
    """Over noisy questions, every changed word is a whole vocabulary word, and repaired
    questions never hold more unknown pieces than the noisy ones."""
    vocab = tok.get_vocab()
    rng = random.Random(0)
    corpus = vocabulary_corpus()
    for q in rng.sample(corpus, 200):
        noisy = add_noise(q, rng)
        fixed = spelling_fixed(tok, noisy)
        before, after = re.findall("[A-Za-z]+", noisy), re.findall("[A-Za-z]+", fixed)
        assert len(before) == len(after)
        assert all(b in vocab for a, b in zip(before, after) if a != b), (noisy, fixed)
        n_noisy = len(tok.encode(noisy).ids)
        assert len(tok.encode(fixed).ids) <= n_noisy


def test_encoding_reads_the_repaired_question(tok):
    typed, _ = encode_question_numbers(tok, "where's teh short circut?", 48)
    meant, _ = encode_question_numbers(tok, "where's the short circuit?", 48)
    assert typed == meant
