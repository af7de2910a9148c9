"""``pcbedge bench --compare BASELINE/report.json``: this run against a previous one.

A slow creep of P95 or of drift across commits is invisible to absolute gates until one breaks.
The compare puts each figure of this run beside the baseline's, with its uncertainty:

* **Latency quantiles** (P50, P90, P95, P99 of a full question) from the raw samples both reports
  keep (``latency_samples_ms.total``): each run's distribution-free order-statistic interval
  (``metrics.percentile_bound``) at confidence sqrt(0.95), so the difference interval
  ``[cur.lower - base.upper, cur.upper - base.lower]`` covers the true difference with
  probability >= 0.95. Statistically significant when it excludes 0. A p-value from the quantile
  test (Mood's median test generalised to quantile q: counts above the pooled q-quantile in a 2x2
  table, Fisher's exact test) goes beside it.
* **Accuracy on the same boards**: per-question correctness, per-board count match and per-question
  agreement with FP32 are paired item by item (``report["paired"]``); McNemar's exact test on the
  discordant pairs, and a Wald interval of the paired difference. Per-board detection errors
  (missed + false at IoU > 0.33): a sign test.
* cold start, throughput, peak RSS, bundle size, pooled mAP: the difference only (one number per
  run, nothing to test).

A latency change is called **significant** only when it is statistically significant *and* at
least :data:`MIN_EFFECT_PCT` percent: run-to-run variation on one machine (clock, cache, memory
placement, a neighbour on the host) is not in a within-run interval (asv's compare applies a
factor 1.1 for the same reason; on the shared 2-core VM of docs/bench.md the same bundle's P50
moved by up to 40% between runs with no load visible inside the VM). Regression gates
(:data:`REGRESSION_GATES`) fail on a statistically significant change beyond their allowance.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pcbedge.benchmarks.metrics import percentile_bound
from pcbedge.errors import PcbEdgeError

JOINT_CONFIDENCE = 0.95
EACH_CONFIDENCE = math.sqrt(JOINT_CONFIDENCE)
ALPHA = 0.05
MIN_EFFECT_PCT = 10.0
QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}
# name -> (compare row, meaning); all "value <= limit", limits >= 0
REGRESSION_GATES = {
    "max_p50_regression_pct": ("latency_p50", "P50 rise vs the baseline, % (fails only when "
                                              "statistically significant)"),
    "max_p95_regression_pct": ("latency_p95", "P95 rise vs the baseline, % (fails only when "
                                              "statistically significant)"),
    "max_question_accuracy_drop": ("question_accuracy", "drop of the share of typed questions "
                                   "answered correctly, paired (McNemar p < 0.05 to fail)"),
    "max_count_match_drop": ("count_exact_match", "drop of board-level count exact match, paired "
                             "(McNemar p < 0.05 to fail)"),
    "max_agreement_drop": ("answer_agreement", "drop of answer agreement with the FP32 reference, "
                           "paired (McNemar p < 0.05 to fail)"),
}


# ----------------------------------------------------------------------------- inputs

def load_baseline(path) -> dict:
    """The baseline report.json (a folder holding one is accepted too), checked for what the
    compare needs."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    fix = "pass the report.json of an earlier pcbedge bench run (its --out folder)"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PcbEdgeError(f"baseline report {p} not found", fix=fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PcbEdgeError(f"baseline report {p} cannot be read: {e}", fix=fix) from None
    samples = (data.get("latency_samples_ms") or {}).get("total") if isinstance(data, dict) \
        else None
    if not isinstance(samples, list) or not samples:
        raise PcbEdgeError(f"baseline report {p} holds no raw latency samples "
                           "(latency_samples_ms.total)", fix=fix)
    # null is a sample strict JSON wrote for a NaN (left out, as NaN would be); text is not
    bad = next(((i, v) for i, v in enumerate(samples) if v is not None and (
        isinstance(v, bool) or not isinstance(v, (int, float)))), None)
    if bad is not None:
        raise PcbEdgeError(f"baseline report {p}: latency_samples_ms.total[{bad[0]}] = "
                           f"{bad[1]!r} is not a number", fix=fix)
    if not any(isinstance(v, (int, float)) and math.isfinite(v) for v in samples):
        raise PcbEdgeError(f"baseline report {p} holds no finite latency sample "
                           "(latency_samples_ms.total is all null, NaN or infinite)", fix=fix)
    data["_path"] = str(p)
    return data


def check_regression_limits(limits: dict | None) -> dict[str, float]:
    """Validated ``{gate name: allowance}``; unknown names and bad numbers fail before the run."""
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise PcbEdgeError("regression_gates must be a dict of name -> allowance",
                           fix=f"names: {', '.join(REGRESSION_GATES)}")
    out = {}
    for name, v in limits.items():
        if name not in REGRESSION_GATES:
            raise PcbEdgeError(f"unknown regression gate {name!r}; valid: "
                               f"{', '.join(REGRESSION_GATES)}", fix="use one of the valid names")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise PcbEdgeError(f"regression gate {name} = {v!r} is not a finite number >= 0",
                               fix=f"pass e.g. --{name.replace('_', '-')} 10")
        out[name] = float(v)
    return out


def agreement_flags(answers: list[list[dict]], ref_answers: list[list[dict]]) -> list[bool]:
    """Per question (workload order): the bundle's defects equal the reference's (drift rule)."""
    from pcbedge.benchmarks.accuracy import _same_defects
    return [_same_defects(a.get("defects", []), r.get("defects", []))
            for ab, rb in zip(answers, ref_answers) for a, r in zip(ab, rb)]


def paired_records(workload, answers: list[list[dict]], agree: list[bool] | None) -> dict:
    """Per-board and per-question outcomes (columns), keyed so another run can be paired."""
    from pcbedge.benchmarks import accuracy as acc
    from pcbedge.benchmarks.metrics import DEEPPCB_IOU, deeppcb_ap
    from pcbedge.benchmarks.workload import board_ground_truth

    preds = acc.describe_predictions(workload, answers)
    boards = {"id": [], "missed": [], "false": [], "count_ok": []}
    for b, pred in zip(workload.boards, preds):
        gt = board_ground_truth(b)
        r = deeppcb_ap([gt], [pred], DEEPPCB_IOU)
        boards["id"].append(f"{b.group}/{b.id}")
        boards["missed"].append(r["n_gt"] - r["tp"])
        boards["false"].append(r["fp"])
        boards["count_ok"].append(len(pred) == len(gt))
    keys = [f"{b.group}/{b.id}|{k}|{q.qa.question}" for i, b in enumerate(workload.boards)
            for k, q in enumerate(workload.board_queries(i))]
    recs = acc.question_records(workload, answers)
    return {"boards": boards,
            "questions": {"key": keys, "kind": [r["kind"] for r in recs],
                          "correct": [r.get("correct") for r in recs],
                          "intent_ok": [r["intent_ok"] for r in recs],
                          "agree": list(agree) if agree is not None else None}}


# ----------------------------------------------------------------------------- tests

def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p of Fisher's exact test on [[a, b], [c, d]] (sum of tables no likelier)."""
    r1, c1, n = a + b, a + c, a + b + c + d
    lo, hi = max(0, c1 - (c + d)), min(r1, c1)

    def logp(x):
        return _log_comb(r1, x) + _log_comb(n - r1, c1 - x) - _log_comb(n, c1)
    obs = logp(a)
    return min(1.0, math.fsum(math.exp(logp(x)) for x in range(lo, hi + 1)
                              if logp(x) <= obs + 1e-7))


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials (sign test, McNemar exact)."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = math.fsum(math.exp(_log_comb(n, i) - n * math.log(2)) for i in range(m + 1))
    return min(1.0, 2.0 * tail)


def quantile_test(base: np.ndarray, cur: np.ndarray, q: float) -> float:
    """p of "same q-quantile": above / not above the pooled q-quantile, Fisher's exact test."""
    m = float(np.quantile(np.concatenate([base, cur]), q))
    a, c = int((base > m).sum()), int((cur > m).sum())
    return fisher_exact(a, base.size - a, c, cur.size - c)


# ----------------------------------------------------------------------------- rows

def _samples(report: dict) -> np.ndarray:
    x = np.asarray((report.get("latency_samples_ms") or {}).get("total") or [], dtype=np.float64)
    return x[np.isfinite(x)]


def latency_row(base: np.ndarray, cur: np.ndarray, q: float) -> dict:
    bb, cb = percentile_bound(base, q, EACH_CONFIDENCE), percentile_bound(cur, q, EACH_CONFIDENCE)
    diff = cb["point"] - bb["point"]
    lo = cb["lower"] - bb["upper"] if None not in (cb["lower"], bb["upper"]) else None
    hi = cb["upper"] - bb["lower"] if None not in (cb["upper"], bb["lower"]) else None
    stat = (lo is not None and lo > 0) or (hi is not None and hi < 0)
    rel = 100.0 * diff / bb["point"] if bb["point"] > 0 else None
    sig = bool(stat and rel is not None and abs(rel) >= MIN_EFFECT_PCT)
    return {"kind": "latency", "unit": "ms", "baseline": bb["point"], "current": cb["point"],
            "delta": diff, "delta_pct": rel, "ci": [lo, hi], "ci_confidence": JOINT_CONFIDENCE,
            "baseline_bound": [bb["lower"], bb["upper"]], "current_bound": [cb["lower"],
                                                                            cb["upper"]],
            "n": [int(base.size), int(cur.size)], "p_value": quantile_test(base, cur, q),
            "test": f"order-statistic intervals; quantile test (Fisher) at q={q}",
            "statistically_significant": bool(stat), "significant": sig,
            "change": ("slower" if diff > 0 else "faster") if sig else "no significant change"}


def _index(paired: dict | None, table: str, key_col: str, col: str) -> dict:
    t = (paired or {}).get(table) or {}
    keys, vals = t.get(key_col), t.get(col)
    if not isinstance(keys, list) or not isinstance(vals, list) or len(keys) != len(vals):
        return {}
    return {k: v for k, v in zip(keys, vals) if isinstance(v, bool)}


def paired_row(base: dict, cur: dict, higher_is_better: bool = True) -> dict | None:
    """McNemar's exact test on two {item: bool} outcomes over their common items."""
    common = sorted(set(base) & set(cur))
    if not common:
        return None
    n = len(common)
    lost = sum(base[k] and not cur[k] for k in common)
    gained = sum(cur[k] and not base[k] for k in common)
    b_rate, c_rate = sum(base[k] for k in common) / n, sum(cur[k] for k in common) / n
    diff = (gained - lost) / n
    se = math.sqrt(max(0.0, (gained + lost) - (gained - lost) ** 2 / n)) / n
    p = binomial_two_sided(lost, lost + gained)
    sig = p < ALPHA
    worse = diff < 0 if higher_is_better else diff > 0
    return {"kind": "paired", "unit": "share", "baseline": b_rate, "current": c_rate,
            "delta": diff, "ci": [diff - 1.96 * se, diff + 1.96 * se], "ci_confidence": 0.95,
            "n": n, "lost": lost, "gained": gained, "p_value": p, "test": "McNemar exact",
            "statistically_significant": sig, "significant": sig,
            "change": ("worse" if worse else "better") if sig else "no significant change"}


def board_errors_row(base: dict | None, cur: dict | None) -> dict | None:
    """Sign test on per-board detection errors (missed + false) of the common boards."""
    def errors(p):
        b = (p or {}).get("boards") or {}
        ids, m, f = b.get("id") or [], b.get("missed") or [], b.get("false") or []
        return {i: x + y for i, x, y in zip(ids, m, f)} if len(ids) == len(m) == len(f) else {}
    eb, ec = errors(base), errors(cur)
    common = sorted(set(eb) & set(ec))
    if not common:
        return None
    worse = sum(ec[k] > eb[k] for k in common)
    better = sum(ec[k] < eb[k] for k in common)
    p = binomial_two_sided(worse, worse + better)
    mb, mc = (float(np.mean([e[k] for k in common])) for e in (eb, ec))
    sig = p < ALPHA
    return {"kind": "paired", "unit": "errors per board", "baseline": mb, "current": mc,
            "delta": mc - mb, "ci": None, "n": len(common), "boards_worse": worse,
            "boards_better": better, "p_value": p, "test": "sign test over boards",
            "statistically_significant": sig, "significant": sig,
            "change": ("worse" if worse > better else "better") if sig else
            "no significant change"}


def _plain_row(b, c, unit: str) -> dict | None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (b, c)):
        return None
    return {"kind": "plain", "unit": unit, "baseline": float(b), "current": float(c),
            "delta": float(c) - float(b),
            "delta_pct": 100.0 * (c - b) / b if b else None, "ci": None, "p_value": None,
            "test": None, "statistically_significant": None, "significant": None,
            "change": "not tested (one number per run)"}


# ----------------------------------------------------------------------------- the comparison

def _notes(base: dict, cur: dict) -> list[str]:
    notes = []
    be, ce = base.get("environment") or {}, cur.get("environment") or {}
    if be.get("manifest_sha256") != ce.get("manifest_sha256"):
        notes.append("another bundle (manifest sha256 differs): the changes are the bundle's "
                     "and the machine's together")
    for k in ("cpu_model", "arch", "threads", "providers", "onnxruntime_version"):
        if be.get(k) != ce.get(k):
            notes.append(f"{k} differs: {be.get(k)!r} then, {ce.get(k)!r} now")
    bw, cw = base.get("workload") or {}, cur.get("workload") or {}
    if (bw.get("n_boards"), bw.get("n_questions")) != (cw.get("n_boards"), cw.get("n_questions")):
        notes.append(f"another workload ({bw.get('n_boards')} boards then, {cw.get('n_boards')} "
                     "now): accuracy is paired on the common boards and questions only")
    for name, r in (("baseline", base), ("current run", cur)):
        if (r.get("machine_state") or {}).get("busy"):
            notes.append(f"the {name} ran on a busy machine: its latency is not trustworthy")
    return notes


def compare_reports(base: dict, cur: dict) -> dict:
    """Every compared figure of ``cur`` against ``base`` (see the module doc)."""
    rows: dict[str, dict] = {}
    bs, cs = _samples(base), _samples(cur)
    if bs.size and cs.size:
        for name, q in QUANTILES.items():
            rows[f"latency_{name}"] = latency_row(bs, cs, q)
    bp, cp = base.get("paired"), cur.get("paired")
    for name, table, col in (("question_accuracy", "questions", "correct"),
                             ("count_exact_match", "boards", "count_ok"),
                             ("intent_accuracy", "questions", "intent_ok"),
                             ("answer_agreement", "questions", "agree")):
        key = "id" if table == "boards" else "key"
        row = paired_row(_index(bp, table, key, col), _index(cp, table, key, col))
        if row is not None:
            rows[name] = row
    row = board_errors_row(bp, cp)
    if row is not None:
        rows["board_errors"] = row
    ba, ca = base.get("accuracy") or {}, cur.get("accuracy") or {}
    plain = {"deeppcb_map": (ba.get("deeppcb_map"), ca.get("deeppcb_map"), "AP"),
             "cold_start_ms": (base.get("cold_start_ms"), cur.get("cold_start_ms"), "ms"),
             "throughput_qps": (base.get("throughput_qps"), cur.get("throughput_qps"), "q/s"),
             "peak_rss_mb": (base.get("peak_rss_mb"), cur.get("peak_rss_mb"), "MB"),
             "bundle_size_mb": (base.get("bundle_size_mb"), cur.get("bundle_size_mb"), "MB")}
    if "answer_agreement" not in rows:
        bd, cd = base.get("drift") or {}, cur.get("drift") or {}
        plain["answer_agreement"] = (bd.get("answer_agreement"), cd.get("answer_agreement"),
                                     "share")
    for name, (b, c, unit) in plain.items():
        row = _plain_row(b, c, unit)
        if row is not None:
            rows[name] = row
    return {"baseline": base.get("_path"), "baseline_created_utc": base.get("created_utc"),
            "baseline_bundle": base.get("bundle"), "rows": rows, "notes": _notes(base, cur),
            "min_effect_pct": MIN_EFFECT_PCT, "alpha": ALPHA}


def evaluate_regression_gates(limits: dict[str, float], comparison: dict) -> dict[str, dict]:
    """Gate dicts in the shape of :func:`pcbedge.benchmarks.gates.evaluate_gates`."""
    out = {}
    for name, limit in limits.items():
        row_name, meaning = REGRESSION_GATES[name]
        row = comparison["rows"].get(row_name)
        g = {"value": None, "limit": limit, "op": "<=", "source": "override (vs baseline)",
             "meaning": meaning}
        if row is None:
            g.update(passed=None, status="skipped",
                     reason=f"no {row_name} in both reports (no raw samples, or no paired "
                            "records / FP32 reference)")
            out[name] = g
            continue
        if row["kind"] == "latency":
            value = row["delta_pct"]
            regressed = row["statistically_significant"] and row["delta"] > 0
        else:
            value = 0.0 - row["delta"]  # a drop is positive (and no "-0" for no change)
            regressed = row["statistically_significant"] and row["delta"] < 0
        g["value"] = value
        ok = not (regressed and value is not None and value > limit + 1e-9)
        g.update(passed=ok, status="passed" if ok else "failed",
                 p_value=row.get("p_value"), ci=row.get("ci"))
        out[name] = g
    return out
