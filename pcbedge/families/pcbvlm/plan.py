"""The graph calls of one typical ``ask`` of the reference model, for ``pcbedge plan``.

One answer (runner.py): the vision graph on the board, the program pass (``decoder_prefill``
over ``grammar.program.visual_tokens`` evenly spaced visual tokens + the question, then
``decoder_step`` per program token) and the board pass (``decoder_prefill`` over the kept
visual tokens + the fixed question with two forced tokens, then a step per emitted token:
a (region, type) pair per defect and ``<eos>``). Within one ``ask`` session the board pass is
shared by every question of a board; ``pcbedge bench`` times single asks, so it is counted here.

The typical sizes were measured on 801 answers (60 validation boards, the bench's held-out
phrasings, x86-cpu bundle, 2026-12-01): question + ``<prog>`` 12.2 tokens, 3.37 program steps,
5.83 defects per board (12.66 board steps).
"""
from __future__ import annotations

from pcbedge.plan import Call
from pcbedge.runtime.pruning import TokenPruningConfig, token_budget

TYPICAL = {"question_tokens": 12.2, "program_steps": 3.37, "defects": 5.83}


def plan_calls(manifest: dict, typical: dict) -> tuple[list[Call], dict]:
    t = {**TYPICAL, **typical}
    size = int(manifest["input_size"])
    n_total = int(manifest["visual_tokens"])
    regions = int(manifest["num_regions"])
    grammar = manifest["answer"]["grammar"]
    n_prog = max(1, min(int(grammar["program"].get("visual_tokens", 8)), n_total))
    pruning = manifest.get("pruning") or {}
    cfg = TokenPruningConfig(**pruning) if pruning else TokenPruningConfig(method="none")
    if "keep_ratio" in typical and cfg.enabled:
        cfg = TokenPruningConfig(method=cfg.method, keep_ratio=float(typical["keep_ratio"]),
                                 min_tokens=cfg.min_tokens)
    kept = token_budget(n_total, cfg)
    canon = len(str(grammar["canonical_question"]).split()) + 3   # words, '.', <bos>, <sep>
    q = float(t["question_tokens"])
    prog_steps = float(t["program_steps"])
    board_steps = 2 * float(t["defects"]) + 1
    board_seq = canon + 2
    calls = [
        Call("vision", "vision", {"batch": 1, "height": size, "width": size}),
        Call("prefill", "decoder_prefill", {"batch": 1, "n_vis": n_prog, "seq": round(q)},
             what="program pass"),
        Call("decode", "decoder_step",
             {"batch": 1, "past_seq": round(n_prog + regions + q + (prog_steps - 1) / 2)},
             count=prog_steps, what="program pass, mean past"),
        Call("prefill", "decoder_prefill", {"batch": 1, "n_vis": kept, "seq": board_seq},
             what="board pass"),
        Call("decode", "decoder_step",
             {"batch": 1, "past_seq": round(kept + regions + board_seq + (board_steps - 1) / 2)},
             count=board_steps, what="board pass, mean past"),
    ]
    info = {"visual_tokens": n_total, "visual_tokens_kept": kept,
            "question_tokens": q, "program_steps": prog_steps, "defects": t["defects"],
            "decode_tokens": prog_steps + board_steps,
            "kv_positions": kept + regions + board_seq + board_steps,
            "source": "measured on 801 validation answers (docs/plan.md)"}
    return calls, info
