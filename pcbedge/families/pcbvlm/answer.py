"""The two decoding passes and the answer they make, shared by the ONNX and torch runners.

Both runners hand in two callables over their own graphs / modules:
``prefill(ids) -> (logits [V+K], past)`` and ``step(token, position, past) -> (logits, past)``.
Pure numpy: this runs on device. See program.py for the grammar of the two passes.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pcbedge.data.query import Program
from pcbedge.families.pcbvlm.grammar import DecodeState, board_defects, build_answer
from pcbedge.families.pcbvlm.program import ProgramState, admitted_regions, answer_tokens

Prefill = Callable[[list], tuple]
Step = Callable[[int, int, object], tuple]


def run_program(spec: dict, prefill: Prefill, step: Step, question_ids: list[int],
                n_numbers: int, max_text_len: int, max_new_tokens: int
                ) -> tuple[ProgramState, list[int]]:
    """The program pass: ``question <prog>`` then the program under its grammar. When only
    ``<eos>`` may follow, it is taken without running the graph."""
    state = ProgramState(spec, n_numbers)
    ids = list(question_ids) + [spec["program"]["prog"]]
    logits, past = prefill(ids)
    pos, out = len(ids), []
    for _ in range(max_new_tokens):
        tok = state.step(logits)
        out.append(tok)
        if state.done or pos >= max_text_len - 1:
            break
        nxt = np.flatnonzero(state.allowed())
        if len(nxt) == 1 and nxt[0] == spec["eos"]:     # after the order: the end is forced
            state.advance(int(nxt[0]))
            out.append(int(nxt[0]))
            break
        logits, past = step(tok, pos, past)
        pos += 1
    return state, out


def run_board(spec: dict, prefill: Prefill, step: Step, question_ids: list[int],
              region_scores: np.ndarray, region_boxes: np.ndarray, max_text_len: int,
              max_new_tokens: int) -> tuple[DecodeState, list[int]]:
    """The board pass: the fixed question with ``<q_describe> <f_all>`` forced, then every
    defect of the board under the pointer grammar."""
    state = DecodeState(spec, region_scores, region_boxes)
    forced = [spec["intents"]["describe"], spec["filters"]["all"]]
    for t in forced:
        state.advance(t)
    ids = list(question_ids) + forced
    logits, past = prefill(ids)
    pos, out = len(ids), list(forced)
    for _ in range(max_new_tokens):
        tok = state.step(logits)
        out.append(tok)
        if state.done or pos >= max_text_len - 1:
            break
        logits, past = step(tok, pos, past)
        pos += 1
    return state, out


def board_budget(spec: dict) -> int:
    """Tokens the board pass may take: intent, filter, a (region, type) pair per proposal,
    ``<eos>``. The board pass is not cut by a question's ``max_new_tokens``: it is one per
    board, shared by every question; the answer's trace is."""
    return 2 * int(spec["num_regions"]) + 3


def compose(spec: dict, program_state: ProgramState, numbers: list[float],
            board_state: DecodeState, region_boxes: np.ndarray, to_original,
            size: tuple[float, float], quality: dict | None = None,
            max_new_tokens: int = 64) -> tuple[dict, list[int]]:
    """The answer JSON and its token trace (the program, then the pointers it admits), the
    trace cut to ``max_new_tokens`` (then only the defects whose pointer and type fit are
    reported, and the answer is marked incomplete)."""
    program: Program = program_state.program(numbers)
    defects = board_defects(board_state, region_boxes, to_original, quality)
    admitted = admitted_regions(program, defects, *size)
    head = _program_tokens(spec, program_state) if program_state.done else \
        list(program_state.trace)
    trace = answer_tokens(spec, head, admitted) if program_state.done else head
    complete = program_state.done and board_state.done and len(trace) <= max_new_tokens
    if len(trace) > max_new_tokens:
        trace = trace[:max_new_tokens]
        room = max(0, (max_new_tokens - len(head)) // 2) if program_state.done else 0
        admitted = admitted[:room]
    if not program_state.done:
        admitted = []
    ans = build_answer(program, admitted, complete=complete, quality=quality,
                       calibration=spec.get("calibration", {}))
    return ans, trace


def _program_tokens(spec: dict, st: ProgramState) -> list[int]:
    p = spec["program"]
    if st.intent == "unsupported" or st.intent is None:
        return [spec["intents"]["unsupported"]]
    ids = [spec["intents"][st.intent]]
    ids += [spec["filters"][t] for t in st.types] or [spec["filters"]["all"]]
    ids += [p["scopes"][st.scope or "board"]] + [p["slots"][i] for i in st.slots]
    return ids + [p["orders"][st.order or "reading"]]
