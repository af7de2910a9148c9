"""The reference PCB VLM's own manifest fields (its ``schema`` role): the answer grammar the
runner decodes with, the KV cache it allocates, the vocabulary the logits cover.

``MANIFEST`` is a ``{field: Spec}`` table over :mod:`pcbedge.bundle.schema`, ``RULES`` the
rules between fields; the runtime checks both when the bundle opens, after the core schema, so
``answer.grammar = {}`` or a token id past the logits is a BundleError naming the field, not a
KeyError in the middle of an answer. Torch-free.
"""
from __future__ import annotations

from pcbedge.bundle.schema import Int, List, Num, Obj, Str, Violation
from pcbedge.data.query import MAX_SLOTS, ORDERS, SCOPES
from pcbedge.families.pcbvlm.grammar import DEFECT_TYPES, INTENTS, REGION_CONFIDENCE
from pcbedge.geometry import OVERLAP_METRICS

TOKEN = Int(0, 1 << 24)
MAX_REGIONS = 4096
ANSWER_MIN_TOKENS = 3    # intent, filter, <eos>: the shortest answer


def _table(keys) -> Obj:
    keys = tuple(keys)
    return Obj({k: TOKEN for k in keys}, required=keys, extra=False)


PROGRAM = Obj({
    "prog": TOKEN,
    "scopes": _table(SCOPES),
    "scope_slots": Obj({k: Int(0, MAX_SLOTS) for k in SCOPES}, required=tuple(SCOPES),
                       extra=False),
    "orders": _table(ORDERS),
    "slots": List(TOKEN, min_len=MAX_SLOTS, max_len=MAX_SLOTS),
    "near_px": Num(0.0, 1e6),
    "visual_tokens": Int(1, 1 << 16),
}, required=("prog", "scopes", "scope_slots", "orders", "slots"))

GRAMMAR = Obj({
    "kind": Str(("pcbvlm-pointer-v3",)),
    "canonical_question": Str(max_len=512),
    "program": PROGRAM,
    **{k: TOKEN for k in ("bos", "sep", "eos", "pad", "region_offset")},
    "intents": _table(INTENTS),
    "filters": _table(("all", *DEFECT_TYPES)),
    "types": _table(DEFECT_TYPES),
    "num_regions": Int(1, MAX_REGIONS),
    "min_region_score": Num(0.0, 1.0),
    "region_prior_weight": Num(-100.0, 100.0),
    "region_prior_center": Num(0.0, 1.0),
    "region_overlap_max": Num(0.0, 1.0),
    "region_overlap_metric": Str(OVERLAP_METRICS),
    "region_confidence": Str(REGION_CONFIDENCE),
    "calibration": Obj({"a": Num(-1e6, 1e6), "b": Num(-1e6, 1e6),
                        "quality": Obj({"residual_ref": Num(0.0, 1.0, lo_open=True),
                                        "c": Num(-1e6, 1e6)},
                                       required=("residual_ref", "c"), nullable=True)}),
}, required=("kind", "bos", "sep", "eos", "pad", "intents", "filters", "types", "region_offset",
             "num_regions", "min_region_score", "canonical_question", "program"))

MANIFEST = {
    "answer": Obj({"grammar": GRAMMAR}, required=("grammar",)),
    "kv_cache": Obj({"num_layers": Int(1, 1024), "num_heads": Int(1, 1024),
                     "head_dim": Int(1, 8192), "max_positions": Int(1, 1 << 20)},
                    required=("num_layers", "num_heads", "head_dim", "max_positions")),
    "num_regions": Int(1, MAX_REGIONS),
    "vocab": Obj({k: Int(1, 1 << 24) for k in ("text", "regions", "logits")},
                 required=("text", "regions", "logits")),
}


def _grammar_matches_the_model(m: dict) -> None:
    """The grammar's regions are the vision head's, and every token id is one the decoder's
    logits cover (an id past them would index out of the logit vector)."""
    g = m["answer"]["grammar"]
    if g["num_regions"] != m["num_regions"]:
        raise Violation("answer.grammar.num_regions", g["num_regions"],
                        f"{m['num_regions']}, the manifest's num_regions")
    logits = (m.get("vocab") or {}).get("logits")
    if logits is None:
        return
    ids = {k: g[k] for k in ("bos", "sep", "eos", "pad")}
    for table in ("intents", "filters", "types"):
        ids.update({f"{table}.{k}": v for k, v in g[table].items()})
    p = g["program"]
    ids["program.prog"] = p["prog"]
    for table in ("scopes", "orders"):
        ids.update({f"program.{table}.{k}": v for k, v in p[table].items()})
    ids.update({f"program.slots.{i}": v for i, v in enumerate(p["slots"])})
    for name, token in ids.items():
        if token >= g["region_offset"]:
            raise Violation(f"answer.grammar.{name}", token,
                            f"a text token id below region_offset ({g['region_offset']})")
    if g["region_offset"] + g["num_regions"] != logits:
        raise Violation("answer.grammar.region_offset", g["region_offset"],
                        f"{logits - g['num_regions']} (vocab.logits {logits} minus "
                        f"{g['num_regions']} regions)")


def _room_for_an_answer(m: dict) -> None:
    need = m["max_question_tokens"] + ANSWER_MIN_TOKENS
    if m["max_text_len"] < need:
        raise Violation("max_text_len", m["max_text_len"],
                        f"at least {need} (max_question_tokens {m['max_question_tokens']} + "
                        f"{ANSWER_MIN_TOKENS} answer tokens)")


RULES = (_grammar_matches_the_model, _room_for_an_answer)
