"""FP32 vs INT8 vision graph of a bundle: latency per op-set choice, and output drift.

    PYTHONPATH=. python benchmarks/quant_vision.py bundles/export --runs 50 --rounds 4 \\
        --threads 2 --out bundles/quant_vision.json

Each variant quantizes the bundle's FP32 ``vision.onnx`` with :func:`quantize_graph` on the
embedded calibration set (or ``--calibration DIR``), then every variant is timed on the same
preprocessed board in a process of its own (:func:`time_isolated`): ``--rounds`` rounds, one
block of ``--runs`` runs (after ``--warmup``) per variant per round, the order reversed every
other round. Median and P95 over all runs, plus the median of the per-round ratios; drift is the
relative L2 error of the visual tokens and of the token prior, and at the detection level the
proposals kept and their score / box differences, against FP32 on ``--drift-boards`` bench
boards (validation side, never calibration boards). This is the measurement behind the x86-cpu profile's ``vision_ops`` (docs/build.md).
Latency does not depend on the weights, so a random-weight export of the same architecture gives
the same table as the trained model; drift does depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pcbedge.recipes.configs import StaticInt8Config

from pcbedge.recipes.quantize import match_detections, quantize_graph
from pcbedge.recipes.report import summarize
from pcbedge.calibration import select_calibration_set
from pcbedge.families.pcbvlm.recipe import iter_vision_inputs
from pcbedge.data.deeppcb import find_data_root, read_list
from pcbedge.data.preprocess import load_pair

CONV = StaticInt8Config(op_types=("Conv",))                  # narrow convs stay float
CONV_RELU = StaticInt8Config(op_types=("Conv", "Relu"))
ALL = {"min_conv_channels": 0}                                   # every conv int8
# name -> (quantization config or None for FP32, onnxruntime graph optimisation level)
VARIANTS: dict[str, tuple[StaticInt8Config | None, str]] = {
    "fp32": (None, "all"),
    "fp32_extended": (None, "extended"),
    "conv_all": (replace(CONV, **ALL), "all"),
    "conv": (CONV, "all"),
    "conv_relu_all": (replace(CONV_RELU, **ALL), "all"),
    "conv_relu": (CONV_RELU, "all"),
    "conv_relu_add": (replace(CONV_RELU, op_types=("Conv", "Relu", "Add")), "all"),
    "conv_relu_add_resize": (replace(CONV_RELU, op_types=("Conv", "Relu", "Add", "Resize")), "all"),
    "conv_relu_add_resize_pool": (replace(CONV_RELU, op_types=(
        "Conv", "Relu", "Add", "Resize", "MaxPool")), "all"),
    "conv_relu_per_tensor": (replace(CONV_RELU, per_channel=False), "all"),
    # kernels that cannot clip on x86 without VNNI (pcbedge.runtime.int8_kernels): 7-bit
    # weights, or u8 x u8 (the x86-cpu / arm64-cpu profiles' choice)
    "conv_relu_reduce_range": (replace(CONV_RELU, reduce_range=True), "all"),
    "conv_relu_u8u8": (replace(CONV_RELU, weight_type="uint8"), "all"),
    "conv_relu_s8s8_sym": (replace(CONV_RELU, activation_type="int8",
                                   activation_symmetric=True), "all"),
    "conv_relu_keep_act": (CONV_RELU.with_options(QDQKeepRemovableActivations=True), "all"),
    "conv_relu_qdq_weight": (CONV_RELU.with_options(AddQDQPairToWeight=True), "all"),
    "conv_relu_no_preprocess": (replace(CONV_RELU, preprocess=False), "all"),
    # before gathers_read_quantized: the whole stride-4 map dequantized for 32 gathered cells
    "conv_relu_gather_float": (replace(CONV_RELU, gather_quantized=False), "all"),
    "conv_relu_extended": (CONV_RELU, "extended"),
    "conv_relu_nospin": (CONV_RELU, "all_nospin"),
    "fp32_nospin": (None, "all_nospin"),
    "conv_relu_entropy": (replace(CONV_RELU, calibration_method="entropy"), "all"),
    # the TensorRT flavour (symmetric int8, float bias) timed on the CPU, for reference
    "trt_flavour": (replace(CONV, activation_type="int8", activation_symmetric=True,
                            extra_options=(("QuantizeBias", False),)), "all"),
}
MIN_REGION_SCORE = 0.05   # PcbVlmConfig.min_region_score: proposals below it are never reported
LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL",
          "all_nospin": "ORT_ENABLE_ALL"}
# session presets beyond the optimisation level: config entries set on the SessionOptions
SESSION_CONFIG = {"all_nospin": {"session.intra_op.allow_spinning": "0"}}


def vision_graph(path: Path) -> tuple[Path, int]:
    """(vision.onnx, input size) of a bundle folder, or a .onnx path (input size from its
    input shape, else 640)."""
    if path.suffix == ".onnx":
        return path, _static_size(path) or 640
    m = json.loads((path / "manifest.json").read_text())
    size = m.get("input_size") or m.get("preprocess", {}).get("input_size") or 640
    return path / m["graphs"]["vision"]["file"], int(size)


def _static_size(path: Path) -> int | None:
    import onnx
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[2].dim_value or None if len(dims) == 4 else None


def make_session(path: Path, threads: int, level: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    for key, value in SESSION_CONFIG.get(level, {}).items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_boards(n: int, size: int) -> list[np.ndarray]:
    boards = read_list(find_data_root(None), "bench.txt")[:n]
    return [load_pair(b.test_path, b.template_path, size)[0][None] for b in boards]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="quant_vision-") as work:
        return _run(args, Path(work))


def _run(args, work: Path) -> dict:
    src, size = vision_graph(Path(args.bundle))
    cal = select_calibration_set(args.calibration or find_data_root(None))
    names = args.variants or list(VARIANTS)
    graphs, reports, qtime = {}, {}, {}
    for name in names:
        config, _ = VARIANTS[name]
        if config is None:
            graphs[name] = src
            continue
        t0 = time.perf_counter()
        reports[name] = quantize_graph(src, work / f"{name}.onnx", config,
                                       iter_vision_inputs(cal, size))
        qtime[name] = time.perf_counter() - t0
        graphs[name] = work / f"{name}.onnx"
        print(f"quantized {name:28s} {qtime[name]:5.1f} s  {summarize(reports[name])}",
              file=sys.stderr)
    boards = bench_boards(args.drift_boards, size)
    x = boards[0]
    np.save(work / "board.npy", x)
    load_before = os.getloadavg()[0]
    times, blocks = time_isolated({n: graphs[n] for n in names}, work / "board.npy", args)
    load_after = os.getloadavg()[0]
    sessions = {n: make_session(graphs[n], args.threads, VARIANTS[n][1]) for n in names}
    profiles = ({n: profile_ops(graphs[n], args.threads, VARIANTS[n][1], x, args.profile)
                 for n in names} if args.profile else {})
    ref_name = "fp32" if "fp32" in names else None
    drift = _drift(sessions, names, boards, ref_name)
    rows = {}
    for n in names:
        t = sorted(times[n])
        rows[n] = {"median_ms": statistics.median(t),
                   "p95_ms": t[min(len(t) - 1, int(np.ceil(0.95 * len(t))) - 1)],
                   "min_ms": t[0], "runs": len(t), "level": LEVELS[VARIANTS[n][1]],
                   "session_config": SESSION_CONFIG.get(VARIANTS[n][1], {}),
                   "config": VARIANTS[n][0].to_dict() if VARIANTS[n][0] else None,
                   "quantize_s": qtime.get(n), **drift.get(n, {}),
                   "placement": summarize(reports[n]) if n in reports else "fp32",
                   "ms_per_op_type": profiles.get(n), "times_ms": [round(v, 3) for v in times[n]]}
    if ref_name:
        for n in names:
            rows[n]["speedup_vs_fp32"] = rows[ref_name]["median_ms"] / rows[n]["median_ms"]
            rows[n].update(paired_speedup(blocks[ref_name], blocks[n]))
            rows[n]["block_medians_ms"] = [round(v, 3) for v in blocks[n]]
    return {"graph": str(src), "input_size": size, "threads": args.threads,
            "runs": args.runs * args.rounds, "rounds": args.rounds, "warmup": args.warmup,
            "timing": "each variant in its own process, one block of runs per round", "calibration": cal.to_manifest(),
            "machine": _machine(), "loadavg_1min": [load_before, load_after], "variants": rows}


def time_isolated(graphs: dict[str, Path], board: Path, args) -> tuple[dict, dict]:
    """Every variant timed in a fresh process of its own, ``args.rounds`` rounds of one block
    of ``args.runs`` runs each, the variant order reversed every other round so slow drifts of
    the machine hit all alike. Returns (all run times, block medians) per variant, in ms.

    Why processes: two onnxruntime sessions in one process each own an intra-op pool whose
    threads spin-wait after a run. Interleaving 20 sessions on 2 cores let the idle ones'
    spinning steal the running one's cores: FP32 read 30 or 61 ms depending on the order
    (docs/build.md). A line PC runs one session per graph, in one process."""
    times: dict[str, list[float]] = {n: [] for n in graphs}
    blocks: dict[str, list[float]] = {n: [] for n in graphs}
    names = list(graphs)
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, "_time", str(graphs[n]), str(board),
                   "--level", VARIANTS[n][1], "--threads", str(args.threads),
                   "--runs", str(args.runs), "--warmup", str(args.warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            t = json.loads(done.stdout.strip().splitlines()[-1])
            times[n] += t
            blocks[n].append(statistics.median(t))
        print(f"timed round {r + 1}/{args.rounds}", file=sys.stderr)
    return times, blocks


def _time_one(argv: list[str]) -> int:
    """Worker: time one graph on one board; prints the run times (ms) as a JSON list."""
    p = argparse.ArgumentParser()
    p.add_argument("graph")
    p.add_argument("board")
    p.add_argument("--level", default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50, help="timed runs per block")
    p.add_argument("--rounds", type=int, default=4,
                   help="blocks per variant, each in a fresh process (runs x rounds in all)")
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args(argv)
    sess = make_session(Path(a.graph), a.threads, a.level)
    feed = {"pixel_values": np.load(a.board)}
    for _ in range(a.warmup):
        sess.run(None, feed)
    out = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps(out))
    return 0


def paired_speedup(ref_ms: list[float], ms: list[float]) -> dict:
    """Speedup read round by round: in round i each variant's block ran minutes apart at most,
    sharing the machine's state then (another VM's burst, a frequency step). The median of the
    per-round ratios cancels that shared noise, which the ratio of the two medians does not;
    its quartiles say how stable it was. Both are reported."""
    r = sorted(a / b for a, b in zip(ref_ms, ms))
    q = lambda f: r[min(len(r) - 1, int(f * (len(r) - 1) + 0.5))]  # noqa: E731
    return {"paired_speedup_median": statistics.median(r), "paired_speedup_q1": q(0.25),
            "paired_speedup_q3": q(0.75), "paired_share_at_least_1_8": sum(x >= 1.8 for x in r) / len(r)}


def profile_ops(graph: Path, threads: int, level: str, x: np.ndarray, runs: int) -> dict:
    """Median milliseconds per run spent in each op type (onnxruntime's profiler; fused nodes
    are named by the kernel that ran, e.g. QLinearConv), summed over the nodes of that type."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    for key, value in SESSION_CONFIG.get(level, {}).items():
        so.add_session_config_entry(key, value)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ortprof-")) / "p")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 2):
        sess.run(None, {"pixel_values": x})
    trace_file = Path(sess.end_profiling())
    trace = json.loads(trace_file.read_text())
    shutil.rmtree(trace_file.parent, ignore_errors=True)
    per_run: dict[str, list[float]] = {}
    runs_seen = [e for e in trace if e.get("name") == "model_run"]
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_run.setdefault(op, []).append(e["dur"] / 1e3)
    n = max(len(runs_seen), 1)
    return dict(sorted(((op, sum(v) / n) for op, v in per_run.items()),
                       key=lambda kv: -kv[1]))


def _drift(sessions, names, boards, ref_name, min_score: float = MIN_REGION_SCORE) -> dict:
    """Per variant, against FP32 on the drift boards: relative L2 error of the visual tokens and
    the token prior, and at the detection level the FP32 proposals scored >= ``min_score``:
    the share the variant also finds (IoU >= 0.5, score >= ``min_score``), and for those the
    mean absolute score difference and mean box-corner difference in input pixels."""
    if ref_name is None:
        return {}
    out_names = [o.name for o in sessions[ref_name].get_outputs()]
    ref = [dict(zip(out_names, sessions[ref_name].run(None, {"pixel_values": b})))
           for b in boards]
    drift = {}
    for n in names:
        vis, prior, kept, dscore, dbox, total = [], [], 0, [], [], 0
        for b, r in zip(boards, ref):
            o = dict(zip(out_names, sessions[n].run(None, {"pixel_values": b})))
            vis.append(relative_error(o["visual_tokens"], r["visual_tokens"]))
            prior.append(relative_error(o["token_prior"], r["token_prior"]))
            k, ds, db, t = match_detections(r, o, min_score)
            kept, total, dscore, dbox = kept + k, total + t, dscore + ds, dbox + db
        drift[n] = {"visual_tokens_rel_err": float(np.mean(vis)),
                    "token_prior_rel_err": float(np.mean(prior)),
                    "fp32_detections": total,
                    "detections_kept": kept / total if total else None,
                    "score_abs_err": float(np.mean(dscore)) if dscore else None,
                    "box_abs_err_px": float(np.mean(dbox)) if dbox else None}
    return drift


def _machine() -> dict:
    import onnxruntime as ort
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
           if f" {f}" in flags]
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "python": platform.python_version()}


def print_table(result: dict) -> None:
    print(f"vision graph {result['graph']} at {result['input_size']}x{result['input_size']}, "
          f"{result['threads']} threads, {result['runs']} runs "
          f"(load avg {result['loadavg_1min'][0]:.1f} -> {result['loadavg_1min'][1]:.1f})")
    print(f"{'variant':28s} {'median ms':>9s} {'p95 ms':>8s} {'min ms':>7s} {'speedup':>7s} "
          f"{'paired':>6s} "
          f"{'vis err':>8s} {'prior err':>9s} {'kept':>5s} {'d score':>8s} {'d box px':>8s}"
          "  placement")
    nan = float("nan")
    for n, r in result["variants"].items():
        print(f"{n:28s} {r['median_ms']:9.1f} {r['p95_ms']:8.1f} {r['min_ms']:7.1f} "
              f"{r.get('speedup_vs_fp32', nan):7.2f} {r.get('paired_speedup_median', nan):6.2f} "
              f"{r.get('visual_tokens_rel_err', nan):8.4f} "
              f"{r.get('token_prior_rel_err', nan):9.4f} "
              f"{_num(r.get('detections_kept')):5.3f} {_num(r.get('score_abs_err')):8.4f} "
              f"{_num(r.get('box_abs_err_px')):8.2f}  {r['placement']}")
    for n, r in result["variants"].items():
        if r.get("ms_per_op_type"):
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(r["ms_per_op_type"].items())[:6])
            print(f"  {n:26s} ms/run by op: {top}")


def _num(v) -> float:
    return float("nan") if v is None else v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", help="an export bundle folder, or a vision .onnx file")
    p.add_argument("--runs", type=int, default=50, help="timed runs per block")
    p.add_argument("--rounds", type=int, default=4,
                   help="blocks per variant, each in a fresh process (runs x rounds in all)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--drift-boards", type=int, default=4)
    p.add_argument("--calibration", default=None, help="calibration folder (default: sample)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=None)
    p.add_argument("--profile", type=int, default=0,
                   help="also profile N runs per variant with onnxruntime's profiler (per op)")
    p.add_argument("--out", default="bundles/quant_vision.json")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_time":
        return _time_one(argv[1:])
    args = p.parse_args(argv)
    if args.runs * args.rounds < 50:
        print("note: fewer than 50 runs; P95 is rough", file=sys.stderr)
    result = run(args)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
