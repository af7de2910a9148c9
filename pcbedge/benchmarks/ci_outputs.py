"""Bench outputs a CI system reads: JUnit XML (one test case per gate) and a Markdown summary.

JUnit follows the Ant / Jenkins schema (testsuites > testsuite > properties, testcase >
failure | skipped, system-out) that GitHub Actions reporters, GitLab and Jenkins read. Suites:

* ``pcbedge.bench.gates``: one case per gate (absolute and vs-baseline); a missed gate is a
  ``failure``, a skipped gate ``skipped``;
* ``pcbedge.bench.figures``: one case per latency / accuracy figure with its bound (the latency
  order-statistic interval, a Wilson interval for shares), informational: they never fail;
* ``pcbedge.bench.machine``: ``machine_idle`` fails when the machine was judged busy;
* ``pcbedge.bench.compare`` (with a baseline): one case per compared figure; a significant change
  is reported in its text, a failed regression gate fails it.

The Markdown summary (``summary.md``) is for ``$GITHUB_STEP_SUMMARY`` or a PR comment.
"""
from __future__ import annotations

import math
import socket
import xml.etree.ElementTree as ET

from pcbedge.data.qa_kinds import NEW_KINDS

SUITE = "pcbedge.bench"
FIGURES = (("latency_ms", "p50"), ("latency_ms", "p95"), ("latency_ms", "p99"))
SHARES = ("deeppcb_map", "count_exact_match", "where_accuracy", "count_accuracy",
          "exists_accuracy", "intent_accuracy", "hallucination_rate") + tuple(
              f"{k}_accuracy" for k in NEW_KINDS)
SHARE_N = {"count_exact_match": "n_boards", "where_accuracy": "n_where_questions",
           "count_accuracy": "n_count_questions", "exists_accuracy": "n_exists_questions",
           "intent_accuracy": "n_questions", "hallucination_rate": "n_predicted",
           **{f"{k}_accuracy": f"n_{k}_questions" for k in NEW_KINDS}}


def _f(v, nd: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score 95% interval of a share ``p`` measured on ``n`` items."""
    if not isinstance(n, int) or n <= 0 or p is None:
        return None
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def _gate_line(name: str, g: dict) -> str:
    text = f"{name}: {_f(g.get('value'))} {g.get('op', '')} {_f(g.get('limit'))} " \
           f"({g.get('status')}, limit from {g.get('source')})"
    if g.get("p_value") is not None:
        text += f", p = {_f(g['p_value'], 3)}"
    return text + (f"; {g['reason']}" if g.get("reason") else "")


# ----------------------------------------------------------------------------- JUnit

def _suite(root: ET.Element, name: str, props: dict | None = None) -> ET.Element:
    s = ET.SubElement(root, "testsuite", name=f"{SUITE}.{name}")
    if props:
        p = ET.SubElement(s, "properties")
        for k, v in props.items():
            ET.SubElement(p, "property", name=str(k), value=_f(v))
    return s


def _case(suite: ET.Element, name: str, text: str, *, failure: str | None = None,
          skipped: str | None = None) -> None:
    c = ET.SubElement(suite, "testcase", name=name, classname=suite.get("name"), time="0")
    if failure is not None:
        ET.SubElement(c, "failure", type="GateFailed" if "gates" in suite.get("name")
                      else "BenchCheck", message=failure).text = text
    elif skipped is not None:
        ET.SubElement(c, "skipped", message=skipped)
    ET.SubElement(c, "system-out").text = text


def _count(suite: ET.Element, elapsed: float, stamp: str | None) -> None:
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", "0")
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    suite.set("time", f"{elapsed:.3f}")
    if stamp:
        suite.set("timestamp", stamp[:19])
    suite.set("hostname", socket.gethostname())


def _machine_text(ms: dict) -> str:
    if not ms:
        return "machine state not recorded"
    lines = [f"busy: {ms.get('busy')} (action on a busy machine: {ms.get('action')})"]
    lines += list(ms.get("reasons") or [])
    lines.append(f"rule: {ms.get('rule')}")
    return "\n".join(lines)


def _figure_cases(suite: ET.Element, report: dict) -> None:
    busy = " [BUSY MACHINE: not trustworthy]" if (report.get("machine_state") or {}) \
        .get("busy") else ""
    for block, key in FIGURES:
        s = report.get(block) or {}
        if s.get(key) is None:
            continue
        text = f"{block}.{key} = {_f(s[key])} ms over {s.get('n')} queries{busy}"
        if key == "p95" and isinstance(s.get("p95_bound"), dict):
            b = s["p95_bound"]
            text += f"; 95% interval [{_f(b.get('lower'))}, {_f(b.get('upper'))}] ms"
        _case(suite, f"latency_{key}_ms", text + _gate_of(report, f"latency_{key}"))
    acc = report.get("accuracy") or {}
    for key in SHARES:
        v = acc.get(key)
        if v is None:
            _case(suite, key, f"{key}: undefined on this data", skipped="undefined")
            continue
        text = f"{key} = {_f(v)}"
        iv = wilson(v, acc.get(SHARE_N.get(key, ""))) if key in SHARE_N else None
        if iv:
            text += f"; Wilson 95% interval [{_f(iv[0])}, {_f(iv[1])}]"
        _case(suite, key, text + _gate_of(report, key))
    d = report.get("drift") or {}
    if d.get("available"):
        iv = wilson(d.get("answer_agreement"), d.get("n_questions"))
        _case(suite, "answer_agreement", f"answer_agreement with FP32 = "
              f"{_f(d.get('answer_agreement'))}" + (f"; Wilson 95% interval [{_f(iv[0])}, "
                                                    f"{_f(iv[1])}]" if iv else ""))


FIGURE_GATES = {"latency_p95": "p95_ms_max", "deeppcb_map": "min_map"}


def _gate_of(report: dict, figure: str) -> str:
    g = (report.get("gates") or {}).get(FIGURE_GATES.get(figure, ""))
    if not isinstance(g, dict):
        return ""
    return f"; gate {FIGURE_GATES[figure]}: {g.get('op')} {_f(g.get('limit'))} ({g.get('status')})"


def render_junit(report: dict) -> str:
    """The JUnit XML text of a report (see the module doc for the suites)."""
    root = ET.Element("testsuites", name=SUITE)
    elapsed = float((report.get("latency_pass") or {}).get("elapsed_s") or 0.0)
    stamp = report.get("created_utc")
    ms = report.get("machine_state") or {}
    gates = _suite(root, "gates", {"bundle": report.get("bundle"), "passed": report.get("passed"),
                                   "machine_busy": ms.get("busy")})
    for name, g in (report.get("gates") or {}).items():
        text = _gate_line(name, g)
        if g.get("passed") is False:
            _case(gates, name, text, failure=text)
        elif g.get("passed") is None:
            _case(gates, name, text, skipped=g.get("reason") or "skipped")
        else:
            _case(gates, name, text)
    figures = _suite(root, "figures")
    _figure_cases(figures, report)
    machine = _suite(root, "machine")
    text = _machine_text(ms)
    _case(machine, "machine_idle", text,
          failure=("machine busy: " + "; ".join(ms.get("reasons") or [])) if ms.get("busy")
          else None, skipped=None if ms else "not recorded")
    cmp_ = report.get("compare")
    if cmp_:
        suite = _suite(root, "compare", {"baseline": cmp_.get("baseline"),
                                         "baseline_created_utc": cmp_.get("baseline_created_utc")})
        failed_rows = {_regression_row(n) for n, g in (report.get("gates") or {}).items()
                       if g.get("passed") is False}
        for name, row in cmp_.get("rows", {}).items():
            text = _compare_text(name, row)
            _case(suite, name, text, failure=text if name in failed_rows else None)
    for s in root.findall("testsuite"):
        _count(s, elapsed if s.get("name").endswith("gates") else 0.0, stamp)
    for k in ("tests", "failures", "errors"):  # the schema has no "skipped" on testsuites
        root.set(k, str(sum(int(s.get(k)) for s in root.findall("testsuite"))))
    root.set("time", f"{elapsed:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") \
        + "\n"


def _regression_row(gate: str) -> str | None:
    from pcbedge.benchmarks.compare import REGRESSION_GATES
    return REGRESSION_GATES.get(gate, (None,))[0]


def _compare_text(name: str, row: dict) -> str:
    ci = row.get("ci")
    ci_s = f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else "n/a"
    pct = f" ({row['delta_pct']:+.1f}%)" if isinstance(row.get("delta_pct"), float) else ""
    return (f"{name}: {_f(row.get('baseline'))} -> {_f(row.get('current'))} {row.get('unit')}, "
            f"change {_f(row.get('delta'))}{pct}, 95% interval {ci_s}, "
            f"p = {_f(row.get('p_value'), 3)} ({row.get('test') or 'no test'}): "
            f"{row.get('change')}")


# ----------------------------------------------------------------------------- Markdown

def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def render_markdown(report: dict) -> str:
    """A job-summary / PR-comment Markdown of the verdict, gates, figures, compare, machine."""
    ms = report.get("machine_state") or {}
    verdict = "PASSED" if report.get("passed") else "FAILED"
    name = str(report.get("bundle", "")).rstrip("/").split("/")[-1]
    out = [f"## pcbedge bench `{name}`: **{verdict}**", "",
           f"{report.get('created_utc', '')}; {(report.get('workload') or {}).get('n_boards')} "
           f"boards, {(report.get('latency_ms') or {}).get('n')} timed queries", ""]
    if ms.get("busy"):
        out += ["> **Warning: busy machine.** The latency figures are not trustworthy.", ">"]
        out += [f"> - {r}" for r in ms.get("reasons") or []] + [""]
    rows = [[n, _f(g.get("value")), f"{g.get('op')} {_f(g.get('limit'))}",
             {"passed": "pass", "failed": "**FAIL**"}.get(g.get("status"), "skipped")]
            for n, g in (report.get("gates") or {}).items()]
    out += ["### Gates", ""] + _md_table(["gate", "value", "limit", "result"], rows)
    lat = report.get("latency_ms") or {}
    b = lat.get("p95_bound") or {}
    out += ["### Figures", ""] + _md_table(["figure", "value"], [
        ["latency P50 / P95 / P99 (ms)", f"{_f(lat.get('p50'))} / {_f(lat.get('p95'))} "
                                         f"[{_f(b.get('lower'))}, {_f(b.get('upper'))}] / "
                                         f"{_f(lat.get('p99'))}"],
        ["cold start (ms)", _f(report.get("cold_start_ms"))],
        ["throughput (q/s)", _f(report.get("throughput_qps"))],
        ["peak RSS (MB)", _f(report.get("peak_rss_mb"))],
        ["bundle size (MB)", _f(report.get("bundle_size_mb"))],
        ["DeepPCB mAP", _f((report.get("accuracy") or {}).get("deeppcb_map"))],
        ["answer agreement with FP32", _f((report.get("drift") or {}).get("answer_agreement"))],
    ])
    cmp_ = report.get("compare")
    if cmp_:
        out += [f"### Against the baseline ({cmp_.get('baseline_created_utc')})", ""]
        out += [f"- {n}" for n in cmp_.get("notes") or []] + ([""] if cmp_.get("notes") else [])
        crow = []
        for n, r in cmp_.get("rows", {}).items():
            ci = r.get("ci")
            crow.append([n, _f(r.get("baseline")), _f(r.get("current")), _f(r.get("delta")),
                         f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else "", _f(r.get("p_value"), 3),
                         f"**{r['change']}**" if r.get("significant") else str(r.get("change"))])
        out += _md_table(["figure", "baseline", "now", "change", "95% interval", "p", "verdict"],
                         crow)
    before, during = ms.get("before") or {}, ms.get("during") or {}
    out += ["### Machine", "", f"- busy: {_f(ms.get('busy'))} (on a busy machine: "
            f"{ms.get('action')}); rule: {ms.get('rule')}",
            f"- other processes' CPU share before / during: "
            f"{_f(before.get('other_cpu_pct_median'), 3)}% / "
            f"{_f(during.get('other_cpu_pct_median'), 3)}%; other runnable tasks: "
            f"{_f(before.get('other_runnable_median'))} / "
            f"{_f(during.get('other_runnable_median'))}",
            f"- CPU governor: {(ms.get('cpu_frequency') or {}).get('governor')}; Jetson power "
            f"mode: {(ms.get('jetson') or {}).get('power_mode') or 'n/a'}", ""]
    return "\n".join(out)
