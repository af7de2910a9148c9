"""What every runner shares: the ``ask`` / ``ask_array`` entry points over ``encode`` and
``answer_encoded`` (which differ per engine). No torch here."""
from __future__ import annotations

import time

import numpy as np

from pcbedge.data.preprocess import PairMeta, load_pair


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


class AskMixin:
    """Needs ``input_size``, ``encode(x)`` and ``answer_encoded(enc, question, meta, ...)``."""

    def ask_array(self, x: np.ndarray, meta: PairMeta | None, question: str, *,
                  max_new_tokens: int = 64, pruning=None) -> dict:
        """Answer about an already preprocessed input [3, S, S]."""
        from pcbedge.runtimes import validate_question
        validate_question(question)
        return self.answer_encoded(self.encode(x), question, meta,
                                   max_new_tokens=max_new_tokens, pruning=pruning)

    def ask(self, test_path, template_path, question: str, *, max_new_tokens: int = 64,
            pruning=None) -> dict:
        """Answer ``question`` about a board image and its golden template."""
        from pcbedge.runtimes import validate_question
        t0 = time.perf_counter()
        validate_question(question)
        x, meta = load_pair(test_path, template_path, self.input_size)
        pre_ms = _ms(t0)
        ans = self.ask_array(x, meta, question, max_new_tokens=max_new_tokens, pruning=pruning)
        ans["latency_ms"]["preprocess"] = pre_ms
        ans["latency_ms"]["total"] = _ms(t0)
        return ans
