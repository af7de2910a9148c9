"""The HTML report's CI-facing sections: verdict banner, run figures, drift side by side, the
comparison with a baseline, machine state, and the gallery legend.

Plain HTML tables and CSS (no SVG, no script): the report stays one self-contained file. Each
function returns "" when its data is absent, so the section is left out.
"""
from __future__ import annotations

from pcbedge.benchmarks.report_html import _esc, _fmt, _table

CSS = """.banner{padding:14px 18px;border-radius:6px;margin:0 0 1em;font-size:16px;color:#fff}
.banner.ok{background:#2a7d2a}.banner.bad{background:#b00}.banner b{font-size:22px}
.banner ul{margin:.4em 0 0 1.2em;padding:0}.busy{background:#fff3cd;color:#664d03;
border:2px solid #e0a800;padding:10px 14px;border-radius:6px;margin:0 0 1em;font-size:15px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:.5em 0 1.5em}.card{border:1px solid #ccc;
border-radius:6px;padding:8px 12px;min-width:150px}.card .v{font-size:20px;font-weight:bold}
.card .k{font-size:13px;color:#555}.legend{font-size:14px;margin:.3em 0 .8em}
.sw{display:inline-block;width:18px;height:12px;margin:0 6px 0 14px;vertical-align:middle;
border:3px solid}.sw.gt{border-color:#00c800}.sw.pred{border-color:#e60000}
.worse{color:#b00;font-weight:bold}.better{color:#2a7d2a;font-weight:bold}"""


def verdict_html(report: dict) -> str:
    """The banner: PASSED / FAILED with the failed gates, the date, and a busy-machine warning."""
    if "passed" not in report:
        return ""
    gates = report.get("gates") if isinstance(report.get("gates"), dict) else {}
    failed = [f"{n}: {_fmt(g.get('value'))} not {g.get('op', '')} {_fmt(g.get('limit'))}"
              for n, g in gates.items() if isinstance(g, dict) and g.get("passed") is False]
    n_ok = sum(isinstance(g, dict) and g.get("passed") is True for g in gates.values())
    n_skip = sum(isinstance(g, dict) and g.get("passed") is None for g in gates.values())
    ok = bool(report.get("passed"))
    head = (f'<div class="banner {"ok" if ok else "bad"}"><b>{"PASSED" if ok else "FAILED"}</b>'
            f" &nbsp; {n_ok} gate(s) passed, {len(failed)} failed, {n_skip} skipped"
            f" &nbsp;|&nbsp; {_esc(report.get('created_utc', ''))}")
    if failed:
        head += "<ul>" + "".join(f"<li>{_esc(f)}</li>" for f in failed) + "</ul>"
    head += "</div>"
    ms = report.get("machine_state") if isinstance(report.get("machine_state"), dict) else {}
    if ms.get("busy"):
        head += ('<div class="busy"><b>Busy machine: the latency figures are not trustworthy.'
                 "</b><ul>" + "".join(f"<li>{_esc(r)}</li>" for r in ms.get("reasons") or [])
                 + "</ul></div>")
    return head


def _card(key: str, value: str) -> str:
    return (f'<div class="card"><div class="v">{_esc(value)}</div>'
            f'<div class="k">{_esc(key)}</div></div>')


def run_html(report: dict) -> str:
    """Cards of the run's headline figures: latency, cold start, throughput, memory, size."""
    lat = report.get("latency_ms") if isinstance(report.get("latency_ms"), dict) else {}
    if not lat and "cold_start_ms" not in report:
        return ""
    w = report.get("workload") if isinstance(report.get("workload"), dict) else {}
    env = report.get("environment") if isinstance(report.get("environment"), dict) else {}

    def ms(v):
        return f"{_fmt(v)} ms" if v is not None else "n/a"
    cards = [("P50 latency", ms(lat.get("p50"))), ("P95 latency", ms(lat.get("p95"))),
             ("P99 latency", ms(lat.get("p99"))), ("cold start", ms(report.get("cold_start_ms"))),
             ("throughput (one stream)", f"{_fmt(report.get('throughput_qps'))} q/s"),
             ("peak RSS", f"{_fmt(report.get('peak_rss_mb'))} MB"),
             ("RSS growth in the latency pass", f"{_fmt(report.get('rss_growth_mb'))} MB"),
             ("bundle size", f"{_fmt(report.get('bundle_size_mb'))} MB"),
             ("boards / questions", f"{_fmt(w.get('n_boards'))} / {_fmt(w.get('n_questions'))}"),
             ("timed queries", _fmt(lat.get("n"))),
             ("threads", "runtime default" if env.get("threads") is None
              else _fmt(env.get("threads"))),
             ("date (UTC)", str(report.get("created_utc", "n/a")).replace("+00:00", ""))]
    return '<div class="cards">' + "".join(_card(k, v) for k, v in cards) + "</div>"


DRIFT_ROWS = ("deeppcb_map", "map_05", "deeppcb_f", "count_exact_match", "hallucination_rate",
              "hallucinations_per_board", "where_accuracy", "count_accuracy", "exists_accuracy",
              "intent_accuracy", "total_accuracy", "verdict_accuracy", "region_accuracy",
              "nearest_accuracy", "two_types_accuracy", "extreme_accuracy", "typos_accuracy",
              "ece")


def drift_html(report: dict) -> str:
    """The FP32 reference and the bundle side by side, with the answer agreement."""
    d = report.get("drift") if isinstance(report.get("drift"), dict) else {}
    if not d:
        return ""
    if not d.get("available"):
        return f"<p>No FP32 reference run: {_esc(d.get('reason', 'not available'))}.</p>"
    ref = d.get("reference_accuracy") or {}
    acc = report.get("accuracy") if isinstance(report.get("accuracy"), dict) else {}
    delta = d.get("delta") or {}
    env = report.get("environment") if isinstance(report.get("environment"), dict) else {}
    rows = [[_esc(k), _esc(_fmt(ref.get(k))), _esc(_fmt(acc.get(k))),
             _esc(_fmt(delta.get(k)) if not isinstance(delta.get(k), dict) else "")]
            for k in DRIFT_ROWS if k in ref or k in acc]
    head = (f"<p>Answer agreement with FP32 <b>{_esc(_fmt(d.get('answer_agreement')))}</b> over "
            f"{_esc(_fmt(d.get('n_questions')))} questions (same defects, boxes within "
            f"{_esc(_fmt(d.get('box_tolerance_px')))} px); intent agreement "
            f"{_esc(_fmt(d.get('intent_agreement')))}. Reference: "
            f"{_esc(d.get('reference', ''))}.</p>")
    label = f"bundle ({env.get('precision') or 'this bundle'})"
    return head + _table(["figure", "FP32 reference", label, "bundle - FP32"], rows)


def compare_html(report: dict) -> str:
    c = report.get("compare") if isinstance(report.get("compare"), dict) else {}
    if not c:
        return ""
    rows = []
    for name, r in (c.get("rows") or {}).items():
        ci = r.get("ci")
        change = str(r.get("change", ""))
        cls = "worse" if change in ("slower", "worse") else "better" \
            if change in ("faster", "better") else ""
        rows.append([_esc(name), _esc(_fmt(r.get("baseline"))), _esc(_fmt(r.get("current"))),
                     _esc(_fmt(r.get("delta"))),
                     _esc(f"[{_fmt(ci[0])}, {_fmt(ci[1])}]") if ci else "",
                     _esc(_fmt(r.get("p_value"))), f'<span class="{cls}">{_esc(change)}</span>'])
    notes = "".join(f"<li>{_esc(n)}</li>" for n in c.get("notes") or [])
    return (f"<p>Baseline {_esc(c.get('baseline', ''))} ({_esc(c.get('baseline_created_utc'))})"
            f"; a latency change counts when significant and at least "
            f"{_esc(_fmt(c.get('min_effect_pct')))}%.</p>" + (f"<ul>{notes}</ul>" if notes else "")
            + _table(["figure", "baseline", "now", "change", "95% interval", "p", "verdict"],
                     rows))


def machine_html(report: dict) -> str:
    ms = report.get("machine_state") if isinstance(report.get("machine_state"), dict) else {}
    if not ms:
        return ""
    keys = ("other_cpu_pct_median", "other_runnable_median", "own_cpu_pct_median",
            "system_cpu_pct_median", "other_cpu_pct_max", "n_samples", "seconds")
    b, d = ms.get("before") or {}, ms.get("during") or {}
    rows = [[_esc(k), _esc(_fmt(b.get(k))), _esc(_fmt(d.get(k)))] for k in keys]
    procs = [f"{p.get('name')} (pid {p.get('pid')}, {_fmt(p.get('cpu_pct_of_one_core'))}% of a "
             "core)" for p in (d.get("busy_processes") or b.get("busy_processes") or [])]
    rows.append(["busiest other processes", "", _esc(", ".join(procs) or "none")])
    facts = {"busy": ms.get("busy"), "on a busy machine": ms.get("action"),
             "policy from": ms.get("policy_source"), "logical CPUs": ms.get("logical_cpus"),
             **{f"cpu {k}": v for k, v in (ms.get("cpu_frequency") or {}).items()},
             **{f"jetson {k}": v for k, v in (ms.get("jetson") or {}).items()}}
    return (f"<p>Rule: {_esc(ms.get('rule', ''))}.</p>"
            + _table(["sample", "before timing", "during the latency pass"], rows)
            + _table(["key", "value"], [[_esc(k), _esc(_fmt(v))] for k, v in facts.items()]))


def gallery_legend_html() -> str:
    return ('<p class="legend"><span class="sw gt"></span>ground truth (DeepPCB annotation)'
            '<span class="sw pred"></span>prediction, labelled "type confidence" (the '
            "describe-all answer). Boards with missed and false defects first.</p>")
