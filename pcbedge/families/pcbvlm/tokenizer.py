"""Tokenizer of the reference PCB VLM, built with the `tokenizers` library (no torch).

WordPiece over lower-cased, accent-stripped words. The vocabulary is computed here, not by a
trainer (the `tokenizers` WordPiece trainer breaks frequency ties differently from process to
process, which made training non-reproducible): every whole word of the *training* phrasings,
then single characters and their ``##`` continuations plus a few English suffixes, so a word
the model never saw reaches it as known pieces ("shortings" -> "short ##ing ##s"), never as a
guess. The answer language's special tokens come first (fixed ids); the region pointer tokens
``<r_0> .. <r_{K-1}>`` are the last K ids, whose logits come from the pointer head.
"""
from __future__ import annotations

import re
import string

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from pcbedge.data.query import extract_numbers
from pcbedge.families.pcbvlm.grammar import SPECIAL_TOKENS

MAX_QUESTION_CHARS = 2000
_NEUTRALISE = str.maketrans({c: " " for c in "<>[]"})
SUFFIXES = ("s", "es", "ed", "ing", "ings", "er", "ers", "ly", "ies")


def _normalizer():
    return normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(),
                                 normalizers.Lowercase()])


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])


def build_tokenizer(corpus: list[str], num_regions: int) -> Tokenizer:
    norm, pre = _normalizer(), _pre_tokenizer()
    words = set()
    for line in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = ([c for c in chars] + [f"##{c}" for c in string.ascii_lowercase + string.digits]
              + [f"##{s}" for s in SUFFIXES])
    vocab: dict[str, int] = {}
    for tok in list(SPECIAL_TOKENS) + sorted(words) + pieces:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=40))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIAL_TOKENS) + [f"<r_{k}>" for k in range(num_regions)])
    full = tok.get_vocab(with_added_tokens=True)
    first = full["<r_0>"]
    assert all(full[f"<r_{k}>"] == first + k for k in range(num_regions))
    assert first + num_regions == tok.get_vocab_size(with_added_tokens=True)
    return tok


_WORD = re.compile(r"[A-Za-z]+")


def _edits(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein distance (adjacent swaps cost 1) of ``a`` and ``b``, or ``limit + 1``
    once it is certain to exceed ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if (prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2]
                    and a[i - 2] == b[j - 1]):
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


_KNOWN: dict[int, tuple] = {}


def _known_words(tok: Tokenizer) -> tuple[dict, list[str]]:
    """The vocabulary and its whole words of 3+ letters, computed once per tokenizer (every
    question reads them)."""
    entry = _KNOWN.get(id(tok))
    if entry is None or entry[0] is not tok:
        vocab = tok.get_vocab(with_added_tokens=False)
        entry = (tok, vocab, [w for w in vocab if len(w) >= 3 and w.isalpha()])
        _KNOWN[id(tok)] = entry
    return entry[1], entry[2]


def spelling_fixed(tok: Tokenizer, text: str) -> str:
    """``text`` with each misspelt word replaced by the one vocabulary word it is nearest to.

    A word is left as it is when the vocabulary has it whole, or as a known word plus one of
    :data:`SUFFIXES` pieces ("shortings"), or when it is shorter than 3 letters. Otherwise the
    whole words of the vocabulary within 1 edit (words of 3-5 letters) or 2 edits (longer)
    are candidates, an edit being an inserted, dropped, changed or swapped letter, except that a
    word of 3-4 letters is never changed into another of its length but by a swap ("most" is
    not "cost"; "hlaf" is "half"). The word is replaced only by a single nearest candidate (a tie
    changes nothing). A word unlike every known one reaches the model as WordPiece pieces, as
    before."""
    vocab, words = _known_words(tok)

    def fix(m: re.Match) -> str:
        w = m.group(0).lower()
        if len(w) < 3 or w in vocab:
            return m.group(0)
        pieces = tok.model.tokenize(w)
        if pieces and pieces[0].value in vocab and len(pieces[0].value) >= 3 and all(
                p.value[2:] in SUFFIXES for p in pieces[1:]):
            return m.group(0)
        limit = 1 if len(w) <= 5 else 2
        best, ties = limit + 1, []
        for cand in words:
            if len(w) <= 4 and len(cand) == len(w) and sorted(cand) != sorted(w):
                continue  # a short word with one letter changed is as often another word
            d = _edits(w, cand, limit)
            if d < best:
                best, ties = d, [cand]
            elif d == best:
                ties.append(cand)
        return ties[0] if best <= limit and len(ties) == 1 else m.group(0)

    return _WORD.sub(fix, text)


def encode_question(tok: Tokenizer, question: str, max_len: int) -> list[int]:
    """``<bos> question-pieces <sep>``, the question cut to ``max_len - 2`` pieces."""
    return encode_question_numbers(tok, question, max_len)[0]


def encode_question_numbers(tok: Tokenizer, question: str, max_len: int
                            ) -> tuple[list[int], list[float]]:
    """As :func:`encode_question`, and the question's numbers: each becomes a slot token
    ``<n_i>`` (program.py) whose value is the i-th of the returned list."""
    vocab = tok.get_vocab(with_added_tokens=True)
    # brackets never carry meaning in an inspector's question, and removing them keeps a typed
    # "<eos>" or "<r_3>" from being read as the answer language's own tokens
    text = question[:MAX_QUESTION_CHARS].translate(_NEUTRALISE)
    text, numbers = extract_numbers(text)
    ids = tok.encode(spelling_fixed(tok, text), add_special_tokens=False).ids
    body = ids[: max_len - 2]
    slots = {vocab.get(f"<n_{i}>") for i in range(len(numbers))}
    kept = sum(1 for t in body if t in slots)
    return [vocab["<bos>"], *body, vocab["<sep>"]], numbers[:kept]
