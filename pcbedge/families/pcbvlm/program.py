"""The question program of the reference PCB VLM and the two-pass answer (numpy, torch-free).

An answer is decoded in two passes over one vision output:

1. **Program pass**, ``<bos> question <sep> <prog>`` over a fixed few visual tokens
   (:func:`program_visual_tokens` of the unpruned ones), then, under this grammar::

       program := INTENT FILTERS SCOPE SLOT* ORDER <eos>  |  <q_unsupported> <eos>
       FILTERS := <f_all>  |  <f_t1> <f_t2> ...     (distinct types, at least one)
       SCOPE   := <s_board> | <s_top> | ... | <s_box> | <s_near> | <s_within> | <s_point>
       SLOT    := <n_i>, i < the question's number count, each once; as many as the scope takes
       ORDER   := <o_reading> | <o_largest> | <o_smallest> | <o_nearest> (a point scope only)

   Numbers in the question reach the decoder as slot tokens ``<n_0> <n_1> ...``
   (:func:`pcbedge.data.query.extract_numbers`), so a coordinate is copied by pointing at it.
   A question's numbers are its scope's arguments, so the program uses every one of them: when
   some scope takes exactly as many numbers as the question holds, only such scopes are
   allowed (two: a point or near it; three: within a radius; four: a box); otherwise any scope
   that takes no more than it holds.
2. **Board pass**, the fixed ``canonical_question`` with ``<q_describe> <f_all>`` forced: the
   pointer grammar of :mod:`grammar` reports every defect of the board with its type and
   confidence. It does not see the inspector's words, so a defect's confidence is a property of
   the board, not of the phrasing, and one board pass serves every question about a board.

The answer's REGION tokens are then constrained to the board-pass regions the program admits
(types, scope), in the program's order: at each step exactly one pointer is allowed (the next
admitted region), then ``<eos>``. A total is the number of regions admitted under ``<f_all>``;
a verdict passes only when none is; the decoder never points outside the asked region.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pcbedge.data.query import (MAX_SLOTS, NEAR_PX, ORDERS, POINT_SCOPES, SCOPES, Program,
                                arrange, select)

PROGRAM_VISUAL_TOKENS = 8   # the program pass's visual prefix: a fixed, evenly spaced few


def program_visual_tokens(n_visual: int, count: int = PROGRAM_VISUAL_TOKENS) -> np.ndarray:
    """Indices of the visual tokens the program pass sees: ``count`` evenly spaced ones (the
    program depends on the question, not the board; a short prefix makes its prefill cheap)."""
    count = max(1, min(int(count), int(n_visual)))
    return np.unique(np.linspace(0, n_visual - 1, count).round().astype(np.int64))


def program_spec(vocab: dict[str, int]) -> dict:
    """The manifest block with the program tokens' ids."""
    return {"prog": vocab["<prog>"],
            "scopes": {s: vocab[f"<s_{s}>"] for s in SCOPES},
            "scope_slots": {s: len(v) for s, v in SCOPES.items()},
            "orders": {o: vocab[f"<o_{o}>"] for o in ORDERS},
            "slots": [vocab[f"<n_{i}>"] for i in range(MAX_SLOTS)],
            "near_px": NEAR_PX, "visual_tokens": PROGRAM_VISUAL_TOKENS}


@dataclass
class ProgramState:
    """Constrained greedy decoding of the program; ``allowed`` gives the logit mask."""
    spec: dict                      # the grammar spec (with its ``program`` block)
    n_numbers: int                  # how many numbers the question holds (slots available)
    phase: str = "intent"           # intent -> filter -> scope -> slot -> order -> done
    intent: str | None = None
    types: list = field(default_factory=list)
    all_types: bool = False
    scope: str | None = None
    slots: list = field(default_factory=list)
    order: str | None = None
    done: bool = False
    trace: list = field(default_factory=list)   # the tokens taken, in order

    def vocab_size(self) -> int:
        return self.spec["region_offset"] + self.spec["num_regions"]

    def _scopes_ok(self) -> list[int]:
        """Scopes that use every number of the question; if none takes exactly that many
        (none, one, or more than a box's four), those that take no more than it holds."""
        p = self.spec["program"]
        exact = [i for s, i in p["scopes"].items() if p["scope_slots"][s] == self.n_numbers]
        return exact or [i for s, i in p["scopes"].items()
                         if p["scope_slots"][s] <= self.n_numbers]

    def allowed(self) -> np.ndarray:
        s, p = self.spec, self.spec["program"]
        if self.phase == "intent":
            ids = list(s["intents"].values())
        elif self.phase == "filter":
            if self.intent == "unsupported":
                ids = [s["eos"]]
            elif not self.types:
                ids = list(s["filters"].values())
            else:
                ids = [i for t, i in s["filters"].items()
                       if t != "all" and t not in self.types] + self._scopes_ok()
        elif self.phase == "scope":
            ids = self._scopes_ok()
        elif self.phase == "slot":
            ids = [t for k, t in enumerate(p["slots"][: min(self.n_numbers, MAX_SLOTS)])
                   if k not in self.slots]
        elif self.phase == "order":
            ids = [i for o, i in p["orders"].items()
                   if o != "nearest" or self.scope in POINT_SCOPES]
        else:
            ids = [s["eos"]]
        mask = np.zeros(self.vocab_size(), dtype=bool)
        mask[ids] = True
        return mask

    def step(self, logits: np.ndarray) -> int:
        ids = np.flatnonzero(self.allowed())
        tok = int(ids[int(np.argmax(allowed_logits(logits, ids)))])
        self.advance(tok)
        return tok

    def advance(self, tok: int) -> None:
        s, p = self.spec, self.spec["program"]
        if not self.allowed()[tok]:
            raise ValueError(f"token {tok} is not allowed in the program's {self.phase} phase")
        self.trace.append(tok)
        if tok == s["eos"]:
            self.phase, self.done = "done", True
        elif self.phase == "intent":
            self.intent = _key_of(s["intents"], tok)
            self.phase = "filter"
        elif self.phase == "filter" and tok in s["filters"].values():
            t = _key_of(s["filters"], tok)
            if t == "all":
                self.all_types, self.phase = True, "scope"
            else:
                self.types.append(t)
        elif self.phase in ("filter", "scope"):
            self.scope = _key_of(p["scopes"], tok)
            self.phase = "slot" if p["scope_slots"][self.scope] else "order"
        elif self.phase == "slot":
            self.slots.append(p["slots"].index(tok))
            if len(self.slots) == p["scope_slots"][self.scope]:
                self.phase = "order"
        elif self.phase == "order":
            self.order = _key_of(p["orders"], tok)
            self.phase = "end"

    def program(self, numbers: list[float]) -> Program:
        return Program(intent=self.intent or "unsupported", types=tuple(self.types),
                       scope=self.scope or "board", slots=tuple(self.slots),
                       order=self.order or "reading", numbers=tuple(numbers))


def allowed_logits(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The logits of the allowed ``ids`` only, non-finite ones clamped, so a degenerate graph
    output (all -inf, NaN, +inf) still yields a well-formed answer with finite confidence."""
    return np.nan_to_num(np.asarray(logits, dtype=np.float64)[ids], nan=-1e30,
                         posinf=1e30, neginf=-1e30)


def _key_of(d: dict, tok: int) -> str:
    for k, v in d.items():
        if v == tok:
            return k
    raise ValueError(f"token {tok} is not one of {sorted(d.values())}")


def admitted_regions(program: Program, board_defects: list[dict], width: float,
                     height: float) -> list[dict]:
    """The board pass's defects the program admits, in its order: the only regions the
    answer's pointer may take, one allowed token per step (then ``<eos>``)."""
    if program.intent == "unsupported":
        return []
    return arrange(program, select(program, board_defects, width, height))


def answer_tokens(spec: dict, program_ids: list[int], admitted: list[dict]) -> list[int]:
    """The whole answer's token trace: the program, then the admitted pointers with their
    types, then ``<eos>``."""
    body = [t for t in program_ids if t != spec["eos"]]
    if body and body[0] == spec["intents"]["unsupported"]:
        return body + [spec["eos"]]
    for d in admitted:
        body += [spec["region_offset"] + int(d["region"]), spec["types"][d["type"]]]
    return body + [spec["eos"]]
