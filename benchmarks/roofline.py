"""This CPU's roofline figures, measured: the peak rates and bandwidth ``pcbedge plan`` needs
for a CPU target's ``[hardware]`` (pcbedge/targets/x86-cpu.toml records the run).

    python benchmarks/roofline.py --threads 2 --out roofline.json

* GEMM rates through onnxruntime's CPU provider (the kernels the bundles run), each a single
  large MatMul node timed after warm-up: fp32 ``MatMul``; int8 ``MatMulInteger`` with u8 x u8
  (what the x86-cpu profile builds) and u8 x s8; 4-bit ``MatMulNBits`` (block 32) at M = 1
  (decode) and M = 256 (prefill), with float compute and with ``accuracy_level`` 4 (``int4a8``:
  int8 activations). Reported as dense TOPS (1 MAC = 2 ops).
* Memory bandwidth: numpy copy of a 512 MiB array (read + write bytes), best of 5; cache
  bandwidth: the same copy of 4 MiB, which stays in the last-level cache.
* Per-node overhead: a chain of 400 tiny Add nodes, minus nothing: time per node.
Each measurement runs in this one process, one after another, on an idle machine (check with
``uptime``); ``--threads`` sets onnxruntime's intra-op threads (the profile's count).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np


def _session(model, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _time(sess, feeds, runs: int) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_rate(kind: str, m: int, k: int, n: int, threads: int, runs: int) -> dict:
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    if kind == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n), np.float32), "W")
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        a_type, y_type, a = TensorProto.FLOAT, TensorProto.FLOAT, \
            rng.standard_normal((m, k), np.float32)
        inits = [w]
        domain = []
    elif kind in ("u8u8", "u8s8"):
        wt = np.uint8 if kind == "u8u8" else np.int8
        w = numpy_helper.from_array(rng.integers(0, 127, (k, n)).astype(wt), "W")
        node = helper.make_node("MatMulInteger", ["A", "W"], ["Y"])
        a_type, y_type, a = TensorProto.UINT8, TensorProto.INT32, \
            rng.integers(0, 255, (m, k)).astype(np.uint8)
        inits = [w]
        domain = []
    elif kind in ("int4", "int4a8"):
        block = 32
        packed = rng.integers(0, 255, (n, k // block, block // 2)).astype(np.uint8)
        scales = rng.random(n * (k // block)).astype(np.float32)
        inits = [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(scales, "S")]
        node = helper.make_node("MatMulNBits", ["A", "W", "S"], ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=block,
                                # int4a8: accuracy_level 4, activations quantized to int8 per
                                # block and int8 dot products (MLAS's CompInt8 path)
                                **({"accuracy_level": 4} if kind == "int4a8" else {}))
        a_type, y_type, a = TensorProto.FLOAT, TensorProto.FLOAT, \
            rng.standard_normal((m, k), np.float32)
        domain = [helper.make_opsetid("com.microsoft", 1)]
    else:
        raise ValueError(kind)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *domain])
    t = _time(_session(model, threads), {"A": a}, runs)
    return {"kind": kind, "m": m, "k": k, "n": n, "median_s": t, "tops": 2 * m * k * n / t / 1e12}


def bandwidth(mib: int = 512) -> dict:
    a = np.ones(mib * 2 ** 20 // 8)
    b = np.empty_like(a)
    best = min(_copy_time(a, b) for _ in range(5))
    return {"bytes": 2 * a.nbytes, "best_s": best, "gbs": 2 * a.nbytes / best / 1e9}


def cache_bandwidth(mib: int = 4, repeats: int = 200) -> dict:
    """A copy that stays in the last-level cache (both arrays fit): GB/s read + write."""
    a = np.ones(mib * 2 ** 20 // 8 // 2)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(sum(_copy_time(a, b) for _ in range(repeats)) / repeats for _ in range(5))
    return {"bytes": 2 * a.nbytes, "best_s": best, "gbs": 2 * a.nbytes / best / 1e9}


def _copy_time(a, b) -> float:
    t0 = time.perf_counter()
    np.copyto(b, a)
    return time.perf_counter() - t0


def node_overhead(threads: int, nodes: int = 400, runs: int = 200) -> dict:
    from onnx import TensorProto, helper, numpy_helper
    one = numpy_helper.from_array(np.ones((1, 8), np.float32), "one")
    chain = [helper.make_node("Add", [f"x{i}", "one"], [f"x{i + 1}"]) for i in range(nodes)]
    graph = helper.make_graph(chain, "chain",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(f"x{nodes}", TensorProto.FLOAT,
                                                             [1, 8])], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    t = _time(sess, {"x0": np.zeros((1, 8), np.float32)}, runs)
    return {"nodes": nodes, "median_s": t, "us_per_node": t / nodes * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = {"machine": platform.machine(), "processor": platform.processor(),
           "threads": args.threads, "gemm": []}
    for kind, m, k, n in (("fp32", 512, 2048, 2048), ("u8u8", 512, 2048, 2048),
                          ("u8s8", 512, 2048, 2048), ("int4", 1, 2048, 8192),
                          ("int4", 256, 2048, 2048), ("int4a8", 1, 2048, 8192),
                          ("int4a8", 256, 2048, 2048), ("fp32", 1, 2048, 8192)):
        r = gemm_rate(kind, m, k, n, args.threads, args.runs)
        res["gemm"].append(r)
        print(f"{kind:5} M={m:4} K={k} N={n}: {r['tops'] * 1e3:8.1f} GOPS "
              f"({r['median_s'] * 1e3:.2f} ms)", flush=True)
    res["bandwidth"] = bandwidth()
    print(f"memory copy: {res['bandwidth']['gbs']:.1f} GB/s (read + write)", flush=True)
    res["cache_bandwidth"] = cache_bandwidth()
    print(f"in-cache copy: {res['cache_bandwidth']['gbs']:.1f} GB/s (read + write)", flush=True)
    res["node_overhead"] = node_overhead(args.threads)
    print(f"per-node overhead: {res['node_overhead']['us_per_node']:.2f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
