"""``pcbedge bench``: latency and accuracy of a bundle on real boards, with named gates.

One harness for every target: cold start, a SingleStream latency pass of full questions, an
accuracy pass over every board x question, drift against the FP32 reference, optional robustness
and precision x pruning sweeps. Outputs (report.json, predictions.jsonl, report.html) are written
atomically and always before a missed gate raises :class:`~pcbedge.errors.GateFailed`.
Figures and protocol: docs/bench.md.
"""
from __future__ import annotations

import datetime as _dt
import gc
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from pcbedge.benchmarks import accuracy as acc_mod
from pcbedge.benchmarks import compare as compare_mod
from pcbedge.benchmarks import gates as gates_mod
from pcbedge.benchmarks import machine_state as ms_mod
from pcbedge.benchmarks import strict_json
from pcbedge.benchmarks import workload as wl
from pcbedge.benchmarks.environment import collect_environment, manifest_sha256
from pcbedge.benchmarks.metrics import latency_summary
from pcbedge.benchmarks.reference import check_reference, resolve_reference
from pcbedge.bundle.manifest import read_manifest_json
from pcbedge.errors import BundleError, GateFailed, MachineBusy, PcbEdgeError

SCHEMA_VERSION = 1
GALLERY_MAX = 24
DEFAULTS = {"out_dir": "bench-out", "queries": 200, "min_seconds": 10.0, "warmup": 5}


# ----------------------------------------------------------------------------- small helpers

class _Rss:
    """Resident set size of this process, sampled at the points the harness chooses."""

    def __init__(self):
        import psutil
        self._proc = psutil.Process()
        self.start = self.peak = self._now()

    def _now(self) -> float:
        return self._proc.memory_info().rss / 2 ** 20

    def sample(self) -> float:
        mb = self._now()
        self.peak = max(self.peak, mb)
        return mb


def _write_atomic(path: Path, text: str) -> None:
    """The package's one writer: temp file beside ``path``, fsync, rename, the user's umask."""
    from pcbedge.bundle.atomic import atomic_write_text
    atomic_write_text(path, text)


def _prepare_out(out_dir, inputs: dict) -> Path:
    """The report folder, created: never one of the bench's ``inputs`` (nor inside or around
    one), and, when not empty, a previous bench report (its files are replaced one by one)."""
    from pcbedge.bundle.outputs import check_output, output_error
    out = Path(out_dir)
    check_output(out, overwrite=True, inputs=inputs, kind="bench")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, out) from None
    return out


def _close_runner(runner) -> None:
    """Release a runner's sessions now (the next runner's memory must not stack on them)."""
    close = getattr(runner, "close", None)
    if callable(close):
        close()


# ----------------------------------------------------------------------------- latency figures

def latency_figures(records: list[dict]) -> dict:
    """Summaries over all questions, per question kind and per stage, plus the raw samples."""
    kinds = list(dict.fromkeys(r["kind"] for r in records))
    samples = {s: [r[s] for r in records if r.get(s) is not None]
               for s in (*wl.STAGES, "total")}
    samples = {s: v for s, v in samples.items() if v}
    return {
        "latency_ms": latency_summary([r["total"] for r in records]),
        "latency_ms_by_kind": {k: latency_summary([r["total"] for r in records if r["kind"] == k])
                               for k in kinds},
        "latency_ms_by_stage": {s: latency_summary(v) for s, v in samples.items()},
        "latency_samples_ms": {**samples, "kind": [r["kind"] for r in records]},
    }


def _cold_start(bundle: Path, workload: wl.Workload, threads, rss: _Rss):
    t0 = time.perf_counter()
    runner = wl.open_runner(bundle, threads=threads)
    t1 = time.perf_counter()
    q = workload.queries[0]
    board = workload.boards[q.board_index]
    runner.ask(board.test_path, board.template_path, q.qa.question,
               max_new_tokens=workload.max_new_tokens)
    t2 = time.perf_counter()
    rss.sample()
    return runner, {"total_ms": (t2 - t0) * 1e3, "load_ms": (t1 - t0) * 1e3,
                    "first_answer_ms": (t2 - t1) * 1e3}


# ----------------------------------------------------------------------------- outputs

def _board_errors(gt: list[dict], pred: list[dict]) -> tuple[int, int]:
    from pcbedge.benchmarks.metrics import DEEPPCB_IOU, deeppcb_ap
    r = deeppcb_ap([gt], [pred], DEEPPCB_IOU)
    return r["n_gt"] - r["tp"], r["fp"]


def build_gallery(workload: wl.Workload, answers: list[list[dict]],
                  limit: int = GALLERY_MAX) -> list[dict]:
    """PNG cards of up to ``limit`` boards, those with misses and false reports first."""
    from pcbedge.benchmarks.report_html import render_boxes_png
    from pcbedge.data.preprocess import read_gray

    preds = acc_mod.describe_predictions(workload, answers)
    rows = []
    for i, board in enumerate(workload.boards):
        gt = wl.board_ground_truth(board)
        missed, false = _board_errors(gt, preds[i])
        rows.append((-(missed + false), i, gt, missed, false))
    rows.sort(key=lambda r: (r[0], r[1]))
    cards = []
    for _, i, gt, missed, false in rows[:limit]:
        board = workload.boards[i]
        kinds = [q.qa.kind for q in workload.board_queries(i)]
        ans = answers[i][kinds.index("describe")]
        answer = textwrap.shorten(str(ans.get("answer", "")), 240, placeholder=" [...]")
        caption = f"{workload.board_queries(i)[kinds.index('describe')].qa.question} -> {answer}"
        cards.append({"id": f"{board.group}/{board.id}", "n_missed": missed, "n_false": false,
                      "caption": caption,
                      "png_bytes": render_boxes_png(read_gray(board.test_path), gt, preds[i])})
    return cards


def _write_outputs(out: Path, report: dict, workload: wl.Workload,
                   answers: list[list[dict]]) -> None:
    from pcbedge.benchmarks.report_html import write_report_html

    preds = acc_mod.describe_predictions(workload, answers)
    lines, bad = [], []
    for n, (b, p) in enumerate(zip(workload.boards, preds), 1):
        rec, _ = strict_json.replace_nonfinite(
            {"id": f"{b.group}/{b.id}", "image": str(b.test_path), "defects": p},
            f"predictions.jsonl:{n}", bad)
        lines.append(strict_json.dumps(rec))
    _write_atomic(out / "predictions.jsonl", "\n".join(lines) + "\n")
    report["outputs"] = {k: str(out / k) for k in ("report.json", "predictions.jsonl",
                                                   "report.html", "junit.xml", "summary.md")}
    # cleaned in place: the report returned, report.json, junit, summary and HTML all agree
    if strict_json.clean_report(report, bad):
        _warn_nonfinite(report["nonfinite_values"]["paths"])
    _write_atomic(out / "report.json", strict_json.dumps(report, indent=2) + "\n")
    _write_ci_outputs(out, report)
    # The HTML draws CDFs from the raw per-stage samples, not from the JSON's summaries.
    html_view = {**report, "latency_ms_by_stage": {
        k: [x for x in v if x is not None]   # a NaN sample is null by now
        for k, v in report["latency_samples_ms"].items() if k != "kind"}}
    write_report_html(out / "report.html", html_view, build_gallery(workload, answers))


def _warn_nonfinite(paths: list[str]) -> None:
    import logging
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    logging.getLogger(__name__).warning("NaN or infinite figures written as null: %s", shown)


def _f(v, nd: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def print_summary(report: dict, out: Path) -> None:
    """A plain-text table of the headline figures and the gates."""
    import click

    w = report["workload"]
    echo = click.echo
    echo(f"\npcbedge bench  {report['bundle']}  ({w['n_boards']} boards, {w['n_questions']} "
         f"questions, {report['question_split']} phrasing)")
    echo(f"{'latency ms':<12}{'n':>6}{'p50':>10}{'p90':>10}{'p95':>10}{'p99':>10}{'max':>10}")
    rows = {"all": report["latency_ms"], **report["latency_ms_by_kind"]}
    for name, s in rows.items():
        echo(f"  {name:<10}{s['n']:>6}" + "".join(f"{_f(s[k], 1):>10}"
                                               for k in ("p50", "p90", "p95", "p99", "max")))
    echo(f"cold start {_f(report['cold_start_ms'], 1)} ms   throughput "
         f"{_f(report['throughput_qps'], 2)} q/s   peak RSS {_f(report['peak_rss_mb'], 0)} MB")
    a = report["accuracy"]
    echo("accuracy   " + "  ".join(f"{k} {_f(a.get(k))}" for k in (
        "deeppcb_map", "deeppcb_f", "map_05", "count_exact_match", "hallucination_rate",
        "count_accuracy", "intent_accuracy")))
    kinds = a.get("question_accuracy_by_kind") or {}
    if kinds:
        echo("questions  " + "  ".join(f"{k} {_f(v)}" for k, v in kinds.items()))
    d = report["drift"]
    echo("drift      " + (f"answer agreement {_f(d['answer_agreement'])}, mAP delta "
                          f"{_f(d['delta']['deeppcb_map'])}" if d.get("available")
                          else f"none ({d.get('reason')})"))
    ms = report.get("machine_state") or {}
    if ms.get("busy"):
        echo("MACHINE BUSY (latency not trustworthy): " + "; ".join(ms.get("reasons") or []))
    for name, row in ((report.get("compare") or {}).get("rows") or {}).items():
        if row.get("significant"):
            echo(f"  vs baseline {name:<18}{_f(row['baseline'])} -> {_f(row['current'])}  "
                 f"p={_f(row.get('p_value'))}  {row['change']}")
    for name, g in report["gates"].items():
        verdict = {"passed": "PASS", "failed": "FAIL"}.get(g["status"], "skip")
        echo(f"  gate {name:<24}{_f(g['value']):>10} {g['op']} {_f(g['limit']):<10}{verdict}")
    echo(f"{'PASSED' if report['passed'] else 'FAILED'}  (report: {out / 'report.html'})")


def _write_ci_outputs(out: Path, report: dict) -> None:
    """junit.xml (one test case per gate) and summary.md (a CI job summary)."""
    from pcbedge.benchmarks.ci_outputs import render_junit, render_markdown
    report, _ = strict_json.replace_nonfinite(report)   # "n/a", never "nan", in CI outputs
    _write_atomic(out / "junit.xml", render_junit(report))
    _write_atomic(out / "summary.md", render_markdown(report))


def _bundle_size_mb(bundle: Path) -> float:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2 ** 20


def _check_machine(out: Path, bundle: Path, policy, progress: bool) -> dict:
    """Sample the machine before timing; on a busy one flag it, or refuse (MachineBusy) after
    writing junit.xml and summary.md that say why (nothing is timed, no report.json)."""
    import click

    before = ms_mod.precheck()
    verdict = ms_mod.judge_busy(before, None, policy)
    if not verdict["busy"]:
        return before
    why = "; ".join(verdict["reasons"])
    if policy.action == "refuse":
        block = {**ms_mod.machine_block(before, None, policy), "refused": True}
        _write_ci_outputs(out, {"title": f"pcbedge bench: {bundle.name}", "bundle": str(bundle),
                                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(
                                    timespec="seconds"), "passed": False, "gates": {},
                                "machine_state": block})
        raise MachineBusy(f"benchmark of {bundle} refused: the machine is busy: {why}",
                          fix="rerun on a quiet machine, or set [bench] busy_machine = \"flag\" "
                              "in the target profile (--busy-machine flag) to time and flag it")
    if progress:
        click.echo(f"warning: the machine is busy ({why}); timing anyway, the report is "
                   "flagged", err=True)
    return before


def plan_vs_measured(bundle: Path, report: dict) -> dict:
    """``pcbedge plan`` of the bundle on its own target beside the measured stage medians
    (docs/plan.md); unavailable, with the reason, for a bundle without a target or a target
    without [hardware]."""
    import importlib.util
    if importlib.util.find_spec("onnx") is None:     # a device install: onnxruntime only
        return {"available": False, "reason": "pcbedge plan reads graphs with onnx, which a "
                                               "device install lacks (the [export] extra)"}
    from pcbedge.plan import plan_bundle
    try:
        plan = plan_bundle(bundle)
    except PcbEdgeError as e:
        return {"available": False, "reason": str(e).split("\n")[0]}
    measured = report.get("latency_ms_by_stage") or {}
    rows = {}
    for stage, st in plan["stages"].items():
        got = (measured.get(stage) or {}).get("p50")
        pred = st["predicted_ms"]
        rows[stage] = {"predicted_ms": pred, "measured_p50_ms": got,
                       "error_pct": (100.0 * (pred - got) / got) if got else None}
    got = (report.get("latency_ms") or {}).get("p50")
    pred = plan["predicted_p50_ms"]
    rows["answer"] = {"predicted_ms": pred, "measured_p50_ms": got,
                      "error_pct": (100.0 * (pred - got) / got) if got else None}
    return {"available": True, "target": plan["target"], "stages": rows,
            "memory": plan["memory"], "meets_budget": plan["meets_budget"]}


# ----------------------------------------------------------------------------- the verb

@dataclass
class _Run:
    """What the bundle's own passes produced (the runner is gone by the time this is used)."""

    cold: dict
    lat: dict
    rss: _Rss
    rss_before: float
    rss_after: float
    answers: list
    accuracy: dict
    robustness: dict | None
    environment: dict
    manifest: dict


def _measure_bundle(bundle: Path, workload: wl.Workload, manifest: dict, *, queries, min_seconds,
                    warmup, robustness, threads, progress, cache=None) -> _Run:
    """Cold start, latency pass, accuracy pass (and robustness) of the bundle itself."""
    rss = _Rss()
    runner, cold = _cold_start(bundle, workload, threads, rss)
    rss_before = rss.sample()
    with ms_mod.Sampler() as sampler:  # is the machine busy while we time? (docs/bench.md)
        lat = wl.latency_pass(runner, workload, queries=queries, min_seconds=min_seconds,
                              warmup=warmup, start=1, progress=progress, on_query=rss.sample)
    lat["machine_during"] = sampler.summary()
    rss_after = rss.sample()
    answers = wl.answer_boards(runner, workload, progress=progress, cache=cache)
    accuracy = acc_mod.score_accuracy(workload, answers)
    robust = acc_mod.run_robustness(runner, workload, accuracy, progress=progress) \
        if robustness else None
    rss.sample()
    env = collect_environment(bundle, runner, threads)
    run_manifest = getattr(runner, "manifest", None) or manifest
    _close_runner(runner)
    del runner
    gc.collect()
    return _Run(cold, lat, rss, rss_before, rss_after, answers, accuracy, robust, env,
                run_manifest)


def _drift(ref_path: Path | None, ref_note: str, workload: wl.Workload, run: _Run, threads,
           progress: bool, out: Path | None = None) -> dict:
    """The same boards and questions through the FP32 reference, compared with the bundle.
    ``out``: resume from (and keep) the reference's answers in ``out/answers`` (--resume); the
    reference is then opened only if a board is missing there."""
    if ref_path is None:
        return {"available": False, "reason": ref_note}
    opened: list = []

    def open_ref():
        opened.append(wl.open_runner(ref_path, threads=threads))
        return opened[0]

    cache = None
    if out is not None:
        from pcbedge.benchmarks.answer_cache import AnswerCache
        cache = AnswerCache(out, "reference", ref_path)
    ref_answers = wl.answer_boards(open_ref if cache is not None else open_ref(), workload,
                                   progress=progress, desc="reference", cache=cache)
    for r in opened:
        _close_runner(r)
    opened.clear()
    gc.collect()
    drift = acc_mod.drift_block(run.answers, ref_answers, run.accuracy,
                                acc_mod.score_accuracy(workload, ref_answers))
    drift.update(reference=str(ref_path), reference_manifest_sha256=manifest_sha256(ref_path),
                 chosen=ref_note)
    if cache is not None:
        drift["answers_reused"] = cache.reused
    drift["question_agreement"] = compare_mod.agreement_flags(run.answers, ref_answers)
    return drift


def _assemble(bundle: Path, workload: wl.Workload, run: _Run, drift: dict, sweep_rows,
              pass_args: dict) -> dict:
    lat = run.lat
    n, elapsed = len(lat["records"]), lat["elapsed_s"]
    return {
        "schema_version": SCHEMA_VERSION,
        "title": f"pcbedge bench: {bundle.name}",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle),
        "question_split": workload.question_split,
        "question_seed": wl.QUESTION_SEED,
        "workload": {"data_root": str(workload.data_root), "list_file": str(workload.list_file),
                     "n_boards": len(workload.boards), "n_questions": len(workload.queries),
                     "max_new_tokens": workload.max_new_tokens},
        "environment": run.environment,
        "cold_start_ms": run.cold["total_ms"],
        "cold_start": run.cold,
        **latency_figures(lat["records"]),
        "latency_pass": {"scenario": "SingleStream", "n": n, "elapsed_s": elapsed, **pass_args},
        "throughput_qps": n / elapsed if elapsed > 0 else None,
        "peak_rss_mb": run.rss.peak,
        "rss_growth_mb": run.rss_after - run.rss_before,
        "memory": {"rss_start_mb": run.rss.start, "rss_before_latency_mb": run.rss_before,
                   "rss_after_latency_mb": run.rss_after, "peak_rss_mb": run.rss.peak},
        "accuracy": run.accuracy,
        "drift": drift,
        "robustness": run.robustness,
        "sweep": sweep_rows,
    }


def run_benchmark(bundle, *, data=None, list_file=None, reference=None, out_dir="bench-out",
                  queries=200, min_seconds=10.0, warmup=5, gates=None, sweep=False,
                  robustness=False, max_boards=None, threads=None, progress=True,
                  compare=None, regression_gates=None, busy_machine=None,
                  resume=False, max_new_tokens=None) -> dict:
    """Benchmark ``bundle`` (a bundle folder, or a model folder for the PyTorch reference).

    Returns the report dict (also ``out_dir/report.json``). Raises GateFailed after writing
    every output when a gate is missed. ``None`` for out_dir / queries / min_seconds / warmup
    means the default (what the CLI passes for an option not given). ``progress=False``
    silences the progress bars and the terminal summary. ``compare``: a baseline report.json
    (docs/bench.md "Compare"), with optional ``regression_gates={name: allowance}``.
    ``busy_machine`` ("flag" / "refuse") overrides the profile's ``[bench] busy_machine``;
    refusing raises MachineBusy (exit 4) before timing, or after writing the outputs when the
    machine became busy during the latency pass. ``resume``: keep each board's answers in
    ``out_dir/answers`` as they are made and reuse those of an earlier run into the same folder
    (:mod:`pcbedge.benchmarks.answer_cache`); the timed pass is always run afresh.
    ``reference``: the FP32 reference folder, None for the one the manifest names, False for
    none (a model too large to hold its float reference on the bench box; the drift gates are
    reported as skipped). ``max_new_tokens`` caps each answer's generated tokens (default 64;
    a model whose answers run to the cap, such as random real-size weights, is timed at a
    chosen answer length).
    """
    out_dir = DEFAULTS["out_dir"] if out_dir is None else out_dir
    pass_args = {"queries": DEFAULTS["queries"] if queries is None else queries,
                 "min_seconds": DEFAULTS["min_seconds"] if min_seconds is None else min_seconds,
                 "warmup": DEFAULTS["warmup"] if warmup is None else warmup}
    wl.check_pass_args(**pass_args)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise PcbEdgeError(f"threads {threads!r} is not a positive integer",
                           fix="pass e.g. threads=2, or None for the bundle's own setting")
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} not found",
                          fix="pass a folder made by pcbedge build (or pcbedge export)")
    manifest = read_manifest_json(bundle)
    limits = gates_mod.resolve_limits(manifest, gates)  # a bad gate fails before the long run
    workload = wl.load_workload(data, list_file, max_boards, max_new_tokens)
    ref_path, ref_note = resolve_reference(bundle, manifest, reference)
    ref_check = check_reference(bundle, manifest, ref_path, warn=progress)  # before any timing
    policy = ms_mod.resolve_policy(manifest, busy_machine)
    regression = compare_mod.check_regression_limits(regression_gates)
    baseline = compare_mod.load_baseline(compare) if compare is not None else None
    if regression and baseline is None:
        raise PcbEdgeError("regression gates need a baseline report",
                           fix="pass compare= (--compare BASELINE/report.json)")
    out = _prepare_out(out_dir, {"bundle": bundle, "data folder": workload.data_root,
                                 "list file": workload.list_file, "reference": ref_path})
    before = _check_machine(out, bundle, policy, progress)

    cache = None
    if resume:
        from pcbedge.benchmarks.answer_cache import AnswerCache
        cache = AnswerCache(out, "bundle", bundle)
    run = _measure_bundle(bundle, workload, manifest, robustness=robustness, threads=threads,
                          progress=progress, cache=cache, **pass_args)
    drift = _drift(ref_path, ref_note, workload, run, threads, progress,
                   out if resume else None)
    if ref_check is not None and drift.get("available"):
        drift["reference_check"] = ref_check
    sweep_rows = None
    if sweep:
        from pcbedge.benchmarks.sweep import run_sweep
        sweep_rows = run_sweep(bundle, ref_path, run.manifest, workload, threads=threads,
                               progress=progress, **pass_args)
    report = _assemble(bundle, workload, run, drift, sweep_rows, pass_args)
    report["bundle_size_mb"] = _bundle_size_mb(bundle)
    report["plan"] = plan_vs_measured(bundle, report)
    if cache is not None:   # --resume: how many boards' answers came from the earlier run
        report["answers_reused"] = {"bundle": cache.reused,
                                    "reference": drift.pop("answers_reused", 0)}
    report["machine_state"] = ms_mod.machine_block(before, run.lat["machine_during"], policy)
    report["paired"] = compare_mod.paired_records(workload, run.answers,
                                                  drift.pop("question_agreement", None))
    report["gates"] = gates_mod.evaluate_gates(limits, report)
    if baseline is not None:
        report["compare"] = compare_mod.compare_reports(baseline, report)
        report["gates"].update(compare_mod.evaluate_regression_gates(regression,
                                                                     report["compare"]))
    failed = gates_mod.failed_gates(report["gates"])
    report["passed"] = not failed
    report["failed_gates"] = failed
    _write_outputs(out, report, workload, run.answers)
    if progress:
        print_summary(report, out)
    if report["machine_state"]["busy"] and policy.action == "refuse":
        raise MachineBusy(f"benchmark of {bundle}: the machine became busy during the timed "
                          f"pass: {'; '.join(report['machine_state']['reasons'])} (report in "
                          f"{out}, flagged)", fix="rerun on a quiet machine")
    if failed:
        raise GateFailed(f"benchmark of {bundle}: gate(s) missed: "
                         f"{gates_mod.describe_failures(report['gates'])} (report in {out})",
                         fix="open report.html; rebuild with another recipe or relax the gate")
    return report
