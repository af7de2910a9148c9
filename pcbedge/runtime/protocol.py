"""The runner protocol every family implements, ONNX Runtime and PyTorch alike:

* ``prepare(image, template=None) -> Prepared``: decode and preprocess the board (and its golden
  template) into the family's model input; question-independent, so one board serves many
  questions;
* ``encode(prepared) -> Encoded``: the vision stage;
* ``answer(encoded, question, *, max_new_tokens, pruning) -> dict``: prompt, decoder, parser:
  the answer JSON (``answer``, ``intent``, ``count``, ``defects`` with ``type``, ``bbox`` in
  original pixels and ``confidence``, ``token_ids``, ``latency_ms``, ``info``).

:meth:`Runner.ask` chains the three and times them; the bench calls the stages itself (one vision
pass per board). Nothing here imports torch or onnxruntime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pcbedge.errors import InputImageError


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


@dataclass
class Prepared:
    """A preprocessed board: the family's model input, the geometry that maps boxes back to the
    original pixels (``meta``), and what preparing it cost."""

    inputs: Any
    meta: Any = None
    preprocess_ms: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Encoded:
    """The vision stage's outputs for one prepared board, reusable for many questions."""

    outputs: Any
    prepared: Prepared
    vision_ms: float = 0.0
    # what a family computes once per board and reuses for every question about it
    cache: dict = field(default_factory=dict)

    @property
    def meta(self):
        return self.prepared.meta


class Runner:
    """Base of every runner: ``ask`` over the three stages. Subclasses set ``manifest``,
    ``template_optional`` and implement ``prepare``, ``encode`` and ``answer``."""

    manifest: dict = {}
    template_optional: bool = False   # True: the family answers from the board image alone

    def prepare(self, image, template=None) -> Prepared:
        raise NotImplementedError

    def encode(self, prepared: Prepared) -> Encoded:
        raise NotImplementedError

    def answer(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64,
               pruning=None) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions or models now (the next runner's memory must not stack on them)."""

    def check_template(self, template) -> None:
        if template is None and not self.template_optional:
            raise InputImageError("this model compares the board with its golden template, "
                                  "and no template was given",
                                  fix="pass the template image (--template)")

    def ask(self, image, template=None, question: str = "", *, max_new_tokens: int = 64,
            pruning=None) -> dict:
        """Answer ``question`` about a board image (and its golden template)."""
        from pcbedge.runtime import validate_max_new_tokens, validate_question
        t0 = time.perf_counter()
        validate_question(question)
        validate_max_new_tokens(max_new_tokens)
        self.check_template(template)
        prepared = self.prepare(image, template)
        prepared.preprocess_ms = ms_since(t0)
        ans = self.answer(self.encode(prepared), question, max_new_tokens=max_new_tokens,
                          pruning=pruning)
        add_capture_warnings(ans, prepared.meta)
        ans["latency_ms"]["preprocess"] = prepared.preprocess_ms
        ans["latency_ms"]["total"] = ms_since(t0)
        return ans


def capture_warnings(meta) -> tuple[str, ...]:
    """What preprocessing found wrong with the images themselves (signs of damaged image data,
    :func:`pcbedge.data.align.find_damage`), from a Prepared's meta; () when none or no meta."""
    quality = getattr(meta, "quality", None)
    return tuple(getattr(quality, "damage", ()) or ())


def add_capture_warnings(ans: dict, meta) -> dict:
    """Append each capture warning to the answer sentence ("Warning: ..."), once."""
    for w in capture_warnings(meta):
        line = f" Warning: {w}; the answer may be wrong."
        if isinstance(ans.get("answer"), str) and line not in ans["answer"]:
            ans["answer"] += line
    return ans
