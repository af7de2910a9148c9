"""Parity of an export with PyTorch: every graph at several input sizes and on real boards, and
the whole answer loop (the same token ids), before the manifest is written.

Graph by graph, each ONNX graph gets the *PyTorch* outputs of the graph before it as inputs, so
an error is charged to the graph that makes it. An output passes where every element satisfies
``|onnx - torch| <= atol + rtol * |torch|`` (numpy's allclose); the report gives per output
``max_abs`` = max |onnx - torch| and ``max_rel`` = max |onnx - torch| / max(|torch|, atol).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pcbedge.errors import ExportError
from pcbedge.export.parity import ParityErrors, check_tolerances
from pcbedge.runtime.protocol import Prepared

log = logging.getLogger(__name__)

DEFAULT_CHECK_BOARDS = 4
BOARD_LIST = "bench.txt"
QUESTIONS = ("where are the defects?", "how many shorts are there?", "is there any open?",
             "what is the weather today")
RANDOM_BATCH = 2    # random-size cases run at batch 2, so the dynamic batch axis is checked too


def default_sizes(input_size: int, multiple: int = 32) -> list[tuple[int, int]]:
    """The default size, a smaller square (640 -> 512) and a non-square one."""
    small = max(multiple * 2, (input_size * 4 // 5) // multiple * multiple)
    if small == input_size:
        small = input_size + multiple
    return [(input_size, input_size), (small, small), (small, input_size)]


def sample_boards(count: int | None, input_size: int) -> tuple[list, dict]:
    """Up to ``count`` boards of the embedded sample's bench list, preprocessed; falls back to
    random inputs (and says so in the returned source block) when the sample is not there."""
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.data.preprocess import load_pair
    from pcbedge.errors import PcbEdgeError

    n = DEFAULT_CHECK_BOARDS if count is None else int(count)
    if n <= 0:
        return [], {"source": "random", "reason": "check_boards=0", "count": 0}
    root = find_data_root(None)
    try:
        boards = read_list(root, BOARD_LIST)[:n]
        pairs = [(b.id, *load_pair(b.test_path, b.template_path, input_size)) for b in boards]
    except PcbEdgeError as e:
        log.warning("embedded sample not usable (%s); parity runs on random inputs only", e)
        return [], {"source": "random", "reason": f"embedded sample not usable: {e}", "count": 0}
    return pairs, {"source": "pcbedge/data/sample", "list": BOARD_LIST, "count": len(pairs),
                   "ids": [p[0] for p in pairs]}


def random_inputs(batch: int, h: int, w: int, seed: int) -> np.ndarray:
    """Board-like random pairs [batch, 3, h, w]: smooth template, test with a changed patch."""
    rng = np.random.default_rng(seed)
    out = np.empty((batch, 3, h, w), np.float32)
    for i in range(batch):
        temp = rng.random((h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
        test = temp.copy()
        y, x = rng.integers(0, h - 24), rng.integers(0, w - 24)
        test[y:y + 16, x:x + 16] = 1.0 - test[y:y + 16, x:x + 16]
        out[i] = np.stack([test, temp, np.abs(test - temp)])
    return out


def align_ties(got: dict, ref: dict, ranked: tuple[str, tuple[str, ...]], atol: float,
               rtol: float) -> tuple[dict, int]:
    """Reorder ONNX's score-ranked outputs (TopK) to PyTorch's order where scores tie within
    the tolerance: such ties are ordered by float noise, differently in each runtime. Returns
    the aligned outputs and how many ranks were reordered."""
    score, dependents = ranked
    s_ref, s_got = ref[score], got[score]
    b, k = s_ref.shape
    perm = np.tile(np.arange(k), (b, 1))
    for i in range(b):
        free = list(range(k))
        for r in range(k):
            tol = atol + rtol * abs(float(s_ref[i, r]))
            cands = [j for j in free if abs(float(s_got[i, j]) - float(s_ref[i, r])) <= tol]
            if not cands:           # a real score error: keep the rank, the check reports it
                cands = [r] if r in free else free[:1]
            j = min(cands, key=lambda j: sum(float(np.abs(got[d][i, j] - ref[d][i, r]).max())
                                            for d in dependents))
            perm[i, r] = j
            free.remove(j)
    out = dict(got)
    for name in (score, *dependents):
        idx = perm.reshape(b, k, *([1] * (got[name].ndim - 2)))
        out[name] = np.take_along_axis(got[name], idx, axis=1)
    return out, int((perm != np.arange(k)).sum())


def _check_chain(family, model, runner, x: np.ndarray, case: str, errors: ParityErrors) -> None:
    """vision -> prefill -> 2 decode steps, each graph fed PyTorch's upstream outputs."""
    sess = runner.sessions
    feeds = {"pixel_values": x}
    ref_v = family.reference(model, "vision", feeds)
    vision = sess["vision"]
    got = dict(zip([o.name for o in vision.get_outputs()], vision.run(None, feeds)))
    if "vision" in family.ranked_outputs:
        got, moved = align_ties(got, ref_v, family.ranked_outputs["vision"], errors.atol,
                                errors.rtol)
        errors.tie_reorders += moved
    for name, ref in ref_v.items():
        errors.add("vision", name, got[name], ref, case)
    ids = np.array([runner.encode_question(QUESTIONS[0])] * x.shape[0], dtype=np.int64)
    feeds = {"visual_tokens": ref_v["visual_tokens"], "region_tokens": ref_v["region_tokens"],
             "input_ids": ids}
    ref = family.reference(model, "decoder_prefill", feeds)
    got = sess["decoder_prefill"].run(["logits", "present"], feeds)
    for name, g in zip(("logits", "present"), got):
        errors.add("decoder_prefill", name, g, ref[name], case)
    pos = ids.shape[1]
    for _ in range(2):
        tok = ref["logits"].argmax(-1).astype(np.int64).reshape(-1, 1)
        feeds = {"input_ids": tok, "positions": np.full_like(tok, pos),
                 "region_tokens": ref_v["region_tokens"], "past": ref["present"]}
        ref = family.reference(model, "decoder_step", feeds)
        got = sess["decoder_step"].run(["logits", "present"], feeds)
        for name, g in zip(("logits", "present"), got):
            errors.add("decoder_step", name, g, ref[name], case)
        pos += 1


def _check_answers(family, model, runner, inputs: list) -> dict:
    """The whole answer loop in ONNX and in PyTorch: the same token ids for every question."""
    checked, mismatches = 0, []
    for label, x, meta in inputs:
        enc = runner.encode(Prepared(x, meta))
        for q in QUESTIONS:
            ref = family.reference_answer(model, x, q, meta)
            got = runner.answer(enc, q)
            checked += 1
            if got["token_ids"] != ref["token_ids"]:
                mismatches.append({"input": label, "question": q, "onnx": got["token_ids"],
                                   "torch": ref["token_ids"]})
    return {"checked": checked, "identical": checked - len(mismatches),
            "questions": list(QUESTIONS), "mismatches": mismatches[:5]}


def check_parity(family, model, bundle_dir: Path, manifest: dict, *, sizes=None,
                 boards: int | None = None, atol: float = 1e-3, rtol: float = 1e-3) -> dict:
    """Run the checks on the staged bundle; the manifest's ``parity`` block, or ExportError."""
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner

    atol, rtol = check_tolerances(atol, rtol)
    input_size = int(manifest["input_size"])
    multiple = int(manifest.get("size_multiple", 32))
    sizes = [tuple(int(v) for v in s) for s in (sizes or default_sizes(input_size, multiple))]
    bad = [s for s in sizes if len(s) != 2 or s[0] % multiple or s[1] % multiple or min(s) <= 0]
    if bad:
        raise ExportError(f"parity sizes {bad} are not (height, width) multiples of {multiple}",
                          fix=f"use sizes such as {default_sizes(input_size, multiple)}")
    runner = PcbVlmOnnxRunner(bundle_dir, manifest, providers=["CPUExecutionProvider"])
    errors = ParityErrors(float(atol), float(rtol))
    for i, (h, w) in enumerate(sizes):
        x = random_inputs(RANDOM_BATCH, h, w, seed=i)
        _check_chain(family, model, runner, x, f"random {h}x{w} batch {RANDOM_BATCH}", errors)
    pairs, board_source = sample_boards(boards, input_size)
    for board_id, x, _meta in pairs:
        _check_chain(family, model, runner, x[None], f"board {board_id}", errors)
    answer_inputs = [(bid, x, meta) for bid, x, meta in pairs] or \
        [(f"random-{i}", random_inputs(1, input_size, input_size, seed=100 + i)[0], None)
         for i in range(2)]
    answers = _check_answers(family, model, runner, answer_inputs)
    report = {"atol": atol, "rtol": rtol, "sizes": [list(s) for s in sizes],
              "random_batch": RANDOM_BATCH, "boards": board_source, "graphs": errors.graphs,
              "tie_reorders": errors.tie_reorders, "answers": answers}
    if errors.failures or answers["mismatches"]:
        report["passed"] = False
        what = errors.failures[:3] + [f"answer to {m['question']!r} on {m['input']}: onnx "
                                      f"{m['onnx']} vs torch {m['torch']}"
                                      for m in answers["mismatches"][:2]]
        raise ExportError("the exported graphs disagree with PyTorch: " + "; ".join(what),
                          fix="see the parity section of docs/export.md; a tolerance that is "
                              "too tight can be raised with atol=/rtol=")
    report["passed"] = True
    return report
