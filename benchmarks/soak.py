"""Soak run: many answers in one process through the OnnxRunner, watching memory and latency.

    python benchmarks/soak.py bundles/x86-cpu --n 10000 --out runs/soak.json

Each answer is a full ``runner.ask`` (decode both images, vision, prefill, decode) on a board of
the embedded sample with a generated question (train and held-out phrasings, off-topic and
unsupported ones included). RSS (psutil) is sampled every ``--every`` answers. The latency of
every answer is kept, and so is every exception (the run goes on). Prints a summary and writes
JSON: RSS start / end / max / growth, P50 / P95 of the first and last 1,000 answers, errors.
Ctrl-C stops early and still writes what was measured.

Exit status: 0; 3 when there were errors or ``--max-growth-mb`` was exceeded.
"""
from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

WINDOW = 1000   # answers in the "first" and "last" latency windows
MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", default="bundles/x86-cpu", type=Path,
                   help="bundle folder (default: bundles/x86-cpu)")
    p.add_argument("--n", type=int, default=10_000, help="answers to run (default 10000)")
    p.add_argument("--every", type=int, default=500, help="RSS sample period in answers")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="board and question order")
    p.add_argument("--max-growth-mb", type=float,
                   help="gate: exit 3 if RSS grows more than this after the first sample")
    p.add_argument("--out", type=Path, default=Path("runs/soak.json"), help="JSON report")
    args = p.parse_args(argv)
    if args.n < 1 or args.every < 1:
        p.error("--n and --every must be positive")
    return args


def workload(seed: int):
    """An endless stream of (board, question) over the embedded sample's boards."""
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.data.qa import QuestionGenerator

    boards = read_list(find_data_root(None), "trainval.txt")
    rng = random.Random(seed)
    gens = [QuestionGenerator(seed, "train"), QuestionGenerator(seed + 1, "heldout")]
    while True:
        board = rng.choice(boards)
        qa = rng.choice(gens).sample({d.type for d in board.defects})
        yield board, qa.question


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None}
    a = np.asarray(values)
    return {"n": len(values), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3)}


def soak(runner, n: int, every: int, seed: int) -> dict:
    """Run ``n`` answers; the raw measurements (latencies, RSS samples, errors)."""
    proc = psutil.Process()
    rss = [(0, proc.memory_info().rss)]
    latencies, errors = [], []
    stream = workload(seed)
    t_start = time.perf_counter()
    done = 0
    try:
        for i in range(1, n + 1):
            board, question = next(stream)
            t0 = time.perf_counter()
            try:
                runner.ask(board.test_path, board.template_path, question)
            except Exception as e:  # a soak records every failure and keeps going
                errors.append({"answer": i, "board": board.id, "question": question,
                               "type": type(e).__name__, "message": str(e)[:300]})
            latencies.append((time.perf_counter() - t0) * 1000.0)
            done = i
            if i % every == 0 or i == n:
                rss.append((i, proc.memory_info().rss))
                last = latencies[-every:]
                print(f"[soak] {i}/{n}  rss {rss[-1][1] / MB:.1f} MB  p50 last {len(last)} "
                      f"{np.percentile(last, 50):.1f} ms  errors {len(errors)}",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"[soak] interrupted after {done} answers", file=sys.stderr)
        rss.append((done, proc.memory_info().rss))
    return {"latencies": latencies, "rss": rss, "errors": errors,
            "seconds": time.perf_counter() - t_start}


def summarize(raw: dict, args: argparse.Namespace, runner) -> dict:
    lat, rss, errors = raw["latencies"], raw["rss"], raw["errors"]
    window = min(WINDOW, max(1, len(lat) // 2))
    values = [r for _, r in rss]
    warm = values[1] if len(values) > 2 else values[0]   # after the first --every answers
    return {
        "bundle": str(args.bundle), "answers": len(lat), "requested": args.n,
        "seconds": round(raw["seconds"], 1), "threads": runner.threads,
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": psutil.cpu_count()},
        "rss_mb": {"start": round(values[0] / MB, 1), "end": round(values[-1] / MB, 1),
                   "max": round(max(values) / MB, 1),
                   "growth": round((values[-1] - values[0]) / MB, 1),
                   "growth_after_first_sample": round((values[-1] - warm) / MB, 1),
                   "samples": [{"answers": i, "rss_mb": round(r / MB, 1)} for i, r in rss]},
        "latency_ms": {"window": window, "first": percentiles(lat[:window]),
                       "last": percentiles(lat[-window:]), "all": percentiles(lat)},
        "errors": {"count": len(errors), "by_type": dict(Counter(e["type"] for e in errors)),
                   "first": errors[:10]},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from pcbedge.errors import PcbEdgeError
    from pcbedge.bundle.atomic import atomic_write_json
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner

    try:
        runner = PcbVlmOnnxRunner(args.bundle, threads=args.threads)
    except PcbEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    report = summarize(soak(runner, args.n, args.every, args.seed), args, runner)
    gate = args.max_growth_mb
    report["max_growth_mb"] = gate
    growth = report["rss_mb"]["growth_after_first_sample"]
    report["passed"] = not report["errors"]["count"] and (gate is None or growth <= gate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    r, lat = report["rss_mb"], report["latency_ms"]
    print(f"soak of {args.bundle}: {report['answers']} answers in {report['seconds']} s\n"
          f"  RSS start {r['start']} MB, end {r['end']} MB, max {r['max']} MB, growth "
          f"{r['growth']} MB ({r['growth_after_first_sample']} MB after the first sample)\n"
          f"  latency first {lat['window']}: P50 {lat['first']['p50_ms']} ms, P95 "
          f"{lat['first']['p95_ms']} ms; last {lat['window']}: P50 {lat['last']['p50_ms']} ms, "
          f"P95 {lat['last']['p95_ms']} ms\n"
          f"  errors {report['errors']['count']} {report['errors']['by_type'] or ''}\n"
          f"  report: {args.out}")
    return 0 if report["passed"] else 3


if __name__ == "__main__":
    sys.exit(main())
