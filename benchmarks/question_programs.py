"""How well the reference model *reads* questions: the program pass alone, per question kind.

For each kind, N questions in held-out (or training) phrasings are decoded into a program by
the PyTorch model (FP32, the program pass of pcbedge.families.pcbvlm.answer, over the fixed few
visual tokens of a real board) and compared with the generator's program: intent, the set of
types, scope, the numbers the slots point at, and order must all match. This separates reading
errors from detection errors (the bench's per-kind accuracy has both).

    python benchmarks/question_programs.py --model pcbedge/families/pcbvlm/reference --n 200
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pcbedge.data.qa import NEW_KINDS, QuestionGenerator
from pcbedge.data.query import SCOPES
from pcbedge.families.pcbvlm.answer import run_program
from pcbedge.families.pcbvlm.model.model import PcbVlm
from pcbedge.families.pcbvlm.program import program_visual_tokens
from pcbedge.families.pcbvlm.tokenizer import encode_question_numbers

OLD = ("where", "count", "exists", "describe", "unsupported")
D = [{"type": "short", "bbox": [100, 100, 130, 130]}, {"type": "open", "bbox": [400, 300, 440, 330]},
     {"type": "spur", "bbox": [500, 500, 520, 520]}, {"type": "mousebite", "bbox": [60, 420, 80, 440]}]


def same(truth, got) -> bool:
    if truth.intent == "unsupported" or got.intent == "unsupported":
        return truth.intent == got.intent
    if (truth.intent, set(truth.types), truth.scope, truth.order) != \
            (got.intent, set(got.types), got.scope, got.order):
        return False
    return [truth.numbers[i] for i in truth.slots] == [got.numbers[i] for i in got.slots] \
        and len(got.slots) == len(SCOPES[got.scope])


def question(gen: QuestionGenerator, kind: str, rng: np.random.Generator):
    present = set(rng.choice(["short", "open", "spur", "mousebite", "pin_hole",
                              "spurious_copper"], size=2, replace=False))
    if kind in NEW_KINDS[:-1]:
        return gen.new_kind(kind, present, D, (640, 640))
    if kind == "typos":
        return gen.typo(present, D, (640, 640))
    if kind == "describe":
        return gen.describe()
    if kind == "unsupported":
        return gen.unsupported()
    return gen.typed(kind, sorted(present)[0])


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pcbedge/families/pcbvlm/reference")
    ap.add_argument("--n", type=int, default=200, help="questions per kind")
    ap.add_argument("--split", default="heldout", choices=("train", "heldout"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = PcbVlm.from_pretrained(args.model)
    enc = model.encode_image(torch.rand(1, 3, model.cfg.input_size, model.cfg.input_size))
    few = program_visual_tokens(enc["visual_tokens"].shape[1],
                                model.spec["program"].get("visual_tokens", 8))
    vis, reg = enc["visual_tokens"][:, torch.as_tensor(few)], enc["region_tokens"]

    def prefill(ids):
        logits, past = model.decoder.prefill(vis, reg, torch.tensor([ids]))
        return logits[0].numpy(), past

    def step(tok, pos, past):
        logits, past = model.decoder.step(torch.tensor([[tok]]), torch.tensor([[pos]]), reg, past)
        return logits[0].numpy(), past

    gen = QuestionGenerator(seed=args.seed, split=args.split)
    rng = np.random.default_rng(args.seed)
    result, errors = {}, {}
    for kind in OLD + NEW_KINDS:
        ok, wrong = 0, Counter()
        for _ in range(args.n):
            qa = question(gen, kind, rng)
            ids, numbers = encode_question_numbers(model.tokenizer, qa.question,
                                                   model.cfg.text.max_text_len // 2)
            st, _ = run_program(model.spec, prefill, step, ids, len(numbers),
                                model.cfg.text.max_text_len, 32)
            got = st.program(numbers)
            if same(qa.meaning(), got):
                ok += 1
            else:
                wrong[f"{qa.question!r} -> {got.intent} {list(got.types)} {got.scope} "
                      f"{got.order}"] += 1
        result[kind] = ok / args.n
        errors[kind] = [e for e, _ in wrong.most_common(5)]
        print(f"{kind:<12} {result[kind]:.3f}   e.g. {errors[kind][:2]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "split": args.split, "n": args.n,
                                        "accuracy": result, "errors": errors}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
