"""Bench gates: named numbers, each checked against one figure of the report.

Limits come, in order of precedence, from the caller's ``gates={name: value}``, the bundle's
target profile (manifest ``target.gates``), then :data:`DEFAULT_GATES`. Drift gates compare with
the FP32 reference run and are skipped (``passed`` None, with a reason) when there is none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pcbedge.errors import PcbEdgeError


@dataclass(frozen=True)
class GateSpec:
    """How one gate reads the report: ``value`` is compared to the limit with ``op``."""

    name: str
    op: str          # "<=" or ">="
    drift: bool      # needs the reference run
    meaning: str


GATE_SPECS: dict[str, GateSpec] = {g.name: g for g in (
    GateSpec("p95_ms_max", "<=", False, "P95 latency of a full question (ms)"),
    GateSpec("max_map_drop", "<=", True, "reference deeppcb_map - bundle deeppcb_map"),
    GateSpec("max_count_drop", "<=", True,
             "reference count_exact_match - bundle count_exact_match (board level)"),
    GateSpec("max_hallucination_rise", "<=", True,
             "bundle - reference hallucinated defects per board (a rate that rises only "
             "because fewer true defects were reported is a recall loss, gated by "
             "max_map_drop)"),
    GateSpec("min_map", ">=", False, "bundle deeppcb_map (absolute floor)"),
    GateSpec("max_question_drop", "<=", True,
             "largest drop, over the question kinds, of reference accuracy - bundle accuracy "
             "(question_accuracy_by_kind)"),
)}
GATE_NAMES = tuple(GATE_SPECS)
DEFAULT_GATES = {"p95_ms_max": 2000.0, "max_map_drop": 0.01, "max_count_drop": 0.01,
                 "max_hallucination_rise": 0.0, "min_map": 0.9, "max_question_drop": 0.02}


def _check_limit(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (name == "p95_ms_max" and value == 0):
        need = "a number > 0" if name == "p95_ms_max" else "a finite number >= 0"
        raise PcbEdgeError(f"gate {name} = {value!r} from {where} is not {need}",
                           fix=f"pass e.g. gates={{'{name}': {DEFAULT_GATES[name]:g}}} "
                               f"(CLI: --{name.replace('_', '-')} {DEFAULT_GATES[name]:g})")
    return float(value)


def resolve_limits(manifest: dict | None, overrides: dict | None) -> dict[str, dict]:
    """{name: {"limit", "source"}} for every gate."""
    if overrides is not None and not isinstance(overrides, dict):
        raise PcbEdgeError(f"gates must be a dict of name -> limit, got {type(overrides).__name__}",
                           fix=f"pass e.g. gates={{'p95_ms_max': 300}}; names: "
                               f"{', '.join(GATE_NAMES)}")
    unknown = sorted(set(overrides or {}) - set(GATE_NAMES), key=str)
    if unknown:
        raise PcbEdgeError(f"unknown gate name(s) {', '.join(map(repr, unknown))}; valid gates: "
                           f"{', '.join(GATE_NAMES)}", fix="use one of the valid names")
    target = (manifest or {}).get("target") or {}
    profile = target.get("gates") if isinstance(target, dict) else None
    profile = profile if isinstance(profile, dict) else {}
    where_profile = f"target profile {target.get('name', '?')!r}" if profile else ""
    limits = {}
    for name in GATE_NAMES:
        if overrides and name in overrides:
            value, source = overrides[name], "override"
        elif profile.get(name) is not None:
            value, source = profile[name], where_profile
        else:
            value, source = DEFAULT_GATES[name], "default"
        limits[name] = {"limit": _check_limit(name, value, source), "source": source}
    return limits


def _values(report: dict) -> dict:
    acc = report.get("accuracy") or {}
    drift = report.get("drift") or {}
    ref = drift.get("reference_accuracy") or {}

    def diff(a, b):
        return float(a) - float(b) if isinstance(a, (int, float)) and \
            isinstance(b, (int, float)) else None

    kinds, ref_kinds = acc.get("question_accuracy_by_kind") or {}, \
        ref.get("question_accuracy_by_kind") or {}
    drops = [diff(ref_kinds.get(k), v) for k, v in kinds.items()]
    drops = [d for d in drops if d is not None]
    return {
        "max_question_drop": max(drops) if drops else None,
        "_question_drops": {k: (diff(ref_kinds.get(k), v), acc.get(f"n_{k}_questions"))
                            for k, v in kinds.items() if diff(ref_kinds.get(k), v) is not None},
        "p95_ms_max": (report.get("latency_ms") or {}).get("p95"),
        "min_map": acc.get("deeppcb_map"),
        "max_map_drop": diff(ref.get("deeppcb_map"), acc.get("deeppcb_map")),
        "max_count_drop": diff(ref.get("count_exact_match"), acc.get("count_exact_match")),
        "max_hallucination_rise": diff(acc.get("hallucinations_per_board"),
                                       ref.get("hallucinations_per_board"))
        if "hallucinations_per_board" in ref else diff(acc.get("hallucination_rate"),
                                                       ref.get("hallucination_rate")),
    }


def evaluate_gates(limits: dict[str, dict], report: dict) -> dict[str, dict]:
    """{name: {"value", "limit", "passed", "status", "op", "source"[, "reason"]}}."""
    values = _values(report)
    has_ref = bool((report.get("drift") or {}).get("available"))
    out = {}
    for name, spec in GATE_SPECS.items():
        lim = limits[name]["limit"]
        g = {"value": values[name], "limit": lim, "op": spec.op,
             "source": limits[name]["source"], "meaning": spec.meaning}
        if spec.drift and not has_ref:
            g.update(passed=None, status="skipped",
                     reason="no FP32 reference run (pass reference=, or build the bundle with one)")
        elif g["value"] is None:
            g.update(passed=None, status="skipped", reason="the figure is undefined on this data")
        elif not math.isfinite(g["value"]):
            # NaN passes no comparison and inf is no measurement: a bug, so the gate fails
            # (never skips); the value itself is written as null (strict JSON)
            g.update(passed=False, status="failed",
                     reason="the figure is NaN or infinite: a bug in the measurement, "
                            "please report it")
        else:
            if name == "max_question_drop":
                # a kind of n questions cannot resolve a limit below one question (1 / n):
                # there the limit is one question, so a 48-board sample is not failed by a
                # single answer (a drop of 2.1 %) while two (4.2 %) still fail
                per_kind = _question_limits(values["_question_drops"], lim)
                if per_kind is not None:
                    ok = per_kind["ok"]
                    if per_kind["limit"] != lim:
                        g.update(limit=per_kind["limit"], profile_limit=lim,
                                 resolution=per_kind["note"])
                    g.update(passed=bool(ok), status="passed" if ok else "failed")
                    out[name] = g
                    continue
            # a 1e-9 slack: a drop of exactly one point (0.755 - 0.745) must not fail on
            # floating-point noise
            ok = g["value"] <= lim + 1e-9 if spec.op == "<=" else g["value"] >= lim - 1e-9
            g.update(passed=bool(ok), status="passed" if ok else "failed")
        out[name] = g
    return out


def _question_limits(drops: dict, lim: float) -> dict | None:
    """Per question kind, the limit it can resolve, max(lim, 1 / n): {"ok", "limit" (that of
    the kind with the largest drop), "note"}; None when no kind says how many questions it
    had (then the plain limit applies)."""
    if not drops or any(not isinstance(n, int) or n <= 0 for _d, n in drops.values()):
        return None
    ok = all(d <= max(lim, 1.0 / n) + 1e-9 for d, n in drops.values())
    kind = max(drops, key=lambda k: drops[k][0])
    n = drops[kind][1]
    return {"ok": ok, "limit": max(lim, 1.0 / n),
            "note": f"{kind}: {n} questions, one question is {1.0 / n:.4f}"}


def failed_gates(gates: dict[str, dict]) -> list[str]:
    return [n for n, g in gates.items() if g.get("passed") is False]


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "null"


def describe_failures(gates: dict[str, dict]) -> str:
    return "; ".join(f"{n}: {_num(g['value'])} not {g['op']} {_num(g['limit'])}"
                     for n, g in gates.items() if g.get("passed") is False)
