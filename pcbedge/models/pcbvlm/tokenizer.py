"""Tokenizer of the reference PCB VLM, built with the `tokenizers` library (no torch).

WordPiece over lower-cased, accent-stripped words, trained on the *training* phrasings only, so a
held-out word reaches the model as known pieces or [UNK] just like an inspector's own word would.
The answer language's special tokens come first (fixed ids); the region pointer tokens
``<r_0> .. <r_{K-1}>`` are the last K ids, whose logits come from the pointer head.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from pcbedge.models.pcbvlm.grammar import SPECIAL_TOKENS

MAX_QUESTION_CHARS = 2000


def build_tokenizer(corpus: list[str], num_regions: int, vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=40))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=1,
                               special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([f"<r_{k}>" for k in range(num_regions)])
    vocab = tok.get_vocab(with_added_tokens=True)
    first = vocab["<r_0>"]
    assert all(vocab[f"<r_{k}>"] == first + k for k in range(num_regions))
    assert first + num_regions == tok.get_vocab_size(with_added_tokens=True)
    return tok


def encode_question(tok: Tokenizer, question: str, max_len: int) -> list[int]:
    """``<bos> question-pieces <sep>``, the question cut to ``max_len - 2`` pieces."""
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = tok.encode(question[:MAX_QUESTION_CHARS], add_special_tokens=False).ids
    body = ids[: max_len - 2]
    return [vocab["<bos>"], *body, vocab["<sep>"]]
