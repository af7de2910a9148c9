"""Fit a CPU target's plan efficiency factors to measured stage medians, and check a plan
against measurements.

    python benchmarks/plan_calibrate.py fit --target pcbedge/targets/x86-cpu.toml \\
        --run bundles/x86-cpu:bench-out/report.json [--run BUNDLE:REPORT ...]
    python benchmarks/plan_calibrate.py check --target x86-cpu --run BUNDLE:REPORT
    python benchmarks/plan_calibrate.py fit --target x86-cpu --run bundles/x86-cpu:bench/report.json \
        --run big/q2b-x86i8:bench8/report.json@benchmarks/real_size/x86-cpu-int8.toml@16

A run's REPORT may also be a ``benchmarks/real_size.py time`` result (own-process medians of one
answer; its new tokens and keep ratio become the plan's). ``fit --precision int4`` fits that
precision's own ``efficiency_compute_by_precision`` alone, the other factors the profile's.

A run may name its own profile (``@PROFILE``: a profile that ``extends`` the target, with the
rates of what that bundle builds, e.g. u8 x s8) and its answers' new tokens (``@N``); the
factors fitted are shared by every run.

``fit``: with the profile's measured peaks and bandwidth fixed, a grid search over
``efficiency_compute`` (0.05-1.0) and ``node_overhead_us`` (0-20 us) minimising the squared
log error of the predicted vision, prefill and decode stages against each run's measured P50
(bench ``latency_ms_by_stage``); ``host_ns_per_value`` is the geometric mean over the runs of
the measured preprocess P50 per float value of the vision inputs (one rate for every family).
``check``: the plan of each bundle beside its measured stage medians, with the
error in percent. The runs must be benched on an idle machine (report ``machine_state``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STAGES = ("vision", "prefill", "decode")


def _runs(specs: list[str]) -> list[tuple]:
    """(bundle, report, profile or None, typical) per ``BUNDLE:REPORT[@PROFILE[@NEW_TOKENS]]``."""
    from pcbedge.targets import load_target
    out = []
    for spec in specs:
        run, *rest = spec.split("@")
        bundle, _, report = run.rpartition(":")
        profile = load_target(rest[0]) if rest and rest[0] else None
        typical = {"new_tokens": int(rest[1])} if len(rest) > 1 else None
        measured = json.loads(Path(report).read_text())
        if "median_ms" in measured:      # a benchmarks/real_size.py time result
            measured, typical = _timed_as_report(measured)
        out.append((Path(bundle), measured, profile, typical))
    return out


def _timed_as_report(t: dict) -> tuple[dict, dict]:
    """A ``real_size.py time`` result (own-process medians of one answer) as the bench report's
    stage block, with its answer's sizes as the plan's typical answer."""
    med = t["median_ms"]
    report = {"latency_ms_by_stage": {s: {"p50": med[s]} for s in STAGES},
              "latency_ms": {"p50": med["wall"]}}
    keep = (t.get("pruning") or {}).get("keep_ratio", 1.0)
    return report, {"new_tokens": int(t["new_tokens"]), "keep_ratio": float(keep)}


def _plan(bundle: Path, profile, typical: dict | None = None) -> dict:
    from pcbedge.plan import plan_bundle
    return plan_bundle(bundle, profile, typical=typical)


def _measured(report: dict) -> dict:
    return {s: v["p50"] for s, v in (report.get("latency_ms_by_stage") or {}).items()
            if isinstance(v, dict) and v.get("p50")}


def _stage_ms(plan: dict, hw, ec: float, tn: float) -> dict:
    """The plan's stages re-predicted with efficiency ``ec`` and ``tn`` us per node (the graph
    costs are the plan's; only the factors change; a precision with its own efficiency in the
    profile keeps it)."""
    from dataclasses import replace

    from pcbedge.plan import compute_s, latency_s
    hw = replace(hw, efficiency_compute=ec)
    return {s: 1e3 * sum(c["count"] * latency_s(
        compute_s({k: t * 1e-3 for k, t in c["compute_floor_by_ms"].items()}, hw),
        c["memory_floor_ms"] * 1e-3, c["nodes"], c["on_chip_ms"] * 1e-3,
        efficiency_memory=hw.efficiency_memory, node_overhead_us=tn)
        for c in plan["stages"][s]["calls"]) for s in STAGES}


def fit(profile, runs) -> dict:
    plans = [(_plan(b, own or profile, typical), _measured(r), (own or profile).hardware)
             for b, r, own, typical in runs]
    best = None
    for ec in [x / 100 for x in range(5, 101)]:
        for tn in [x / 10 for x in range(0, 201)]:
            err = 0.0
            for plan, got, hw in plans:
                pred = _stage_ms(plan, hw, ec, tn)
                err += sum(math.log(pred[s] / got[s]) ** 2 for s in STAGES if got.get(s))
            if best is None or err < best[0]:
                best = (err, ec, tn)
    # one host rate for every family: the geometric mean over the runs of the measured
    # preprocess P50 per float value the host writes into the vision inputs
    ns = [math.log(got["preprocess"] * 1e6 / plan["typical_answer"]["host_values"])
          for plan, got, _ in plans if got.get("preprocess")
          and plan["typical_answer"].get("host_values")]
    return {"efficiency_compute": best[1], "node_overhead_us": best[2],
            "host_ns_per_value": round(math.exp(sum(ns) / len(ns)), 2) if ns else None,
            "rms_log_error": math.sqrt(best[0] / max(1, 3 * len(runs)))}


def fit_precision(profile, runs, precision: str) -> dict:
    """``efficiency_compute_by_precision[precision]`` alone (0.05-1.0), every other factor the
    profile's: for kernels that run nearer their measured rate than the rest."""
    from dataclasses import replace
    plans = [(_plan(b, own or profile, typical), _measured(r), (own or profile).hardware)
             for b, r, own, typical in runs]
    best = None
    for e in [x / 100 for x in range(5, 101)]:
        err = 0.0
        for plan, got, hw in plans:
            hw = replace(hw, efficiency_compute_by_precision={
                **hw.efficiency_compute_by_precision, precision: e})
            pred = _stage_ms(plan, hw, hw.efficiency_compute, hw.node_overhead_us)
            err += sum(math.log(pred[s] / got[s]) ** 2 for s in STAGES if got.get(s))
        if best is None or err < best[0]:
            best = (err, e)
    return {"efficiency_compute_by_precision": {precision: best[1]},
            "rms_log_error": math.sqrt(best[0] / max(1, 3 * len(runs)))}


def check(profile, runs) -> list[dict]:
    rows = []
    for bundle, report, own, typical in runs:
        got, plan = _measured(report), _plan(bundle, own or profile, typical)
        for s in ("preprocess", *STAGES):
            pred = plan["stages"][s]["predicted_ms"]
            rows.append({"bundle": str(bundle), "stage": s, "predicted_ms": round(pred, 2),
                         "measured_p50_ms": got.get(s),
                         "error_pct": round(100 * (pred - got[s]) / got[s], 1)
                         if got.get(s) else None})
        total = (report.get("latency_ms") or {}).get("p50")
        rows.append({"bundle": str(bundle), "stage": "answer",
                     "predicted_ms": round(plan["predicted_p50_ms"], 2),
                     "measured_p50_ms": total,
                     "error_pct": round(100 * (plan["predicted_p50_ms"] - total) / total, 1)
                     if total else None})
    return rows


def main(argv=None) -> int:
    from pcbedge.targets import load_target
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("fit", "check"))
    ap.add_argument("--target", required=True)
    ap.add_argument("--run", action="append", required=True, help="BUNDLE:REPORT.json")
    ap.add_argument("--precision", help="fit only this precision's own compute efficiency")
    args = ap.parse_args(argv)
    profile, runs = load_target(args.target), _runs(args.run)
    if args.cmd == "fit" and args.precision:
        print(json.dumps(fit_precision(profile, runs, args.precision), indent=2))
    elif args.cmd == "fit":
        print(json.dumps(fit(profile, runs), indent=2))
    else:
        for row in check(profile, runs):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
