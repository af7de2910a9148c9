"""pcbedge plan: MAC counts checked by hand on small graphs (shape arithmetic folded, QDQ and
4-bit precisions, matrix-vector products), the roofline arithmetic, plans of tiny bundles of
every family, the [hardware] section's validation and profile inheritance, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcbedge.errors import OutputError, TargetError
from pcbedge.targets import list_targets, load_target
from pcbedge.targets.profile import parse_profile

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pcbedge.plan.graph_cost import graph_cost  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _save(tmp_path, nodes, inputs, outputs, inits, name="g.onnx", ms=False) -> Path:
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)]
                                             if ms else [])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=opsets)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _w(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype), name)


def test_conv_and_matmul_macs_by_hand_with_a_reshape_computed_from_shape(tmp_path):
    # x [1, 3, H, W] -> Conv 4x3x3x3 pad 1 -> [1, 4, H, W] -> reshape to [1, 4, H*W] whose target
    # comes from Shape at run time -> transpose -> MatMul with [4, 8] -> [1, H*W, 8]
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Slice", ["s", "st", "en"], ["s01"]),
        helper.make_node("Concat", ["s01", "minus1"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["c", "tgt"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "mw"], ["y"]),
    ]
    inits = [_w("cw", 4, 3, 3, 3), _w("mw", 4, 8),
             numpy_helper.from_array(np.array([0], np.int64), "st"),
             numpy_helper.from_array(np.array([2], np.int64), "en"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    path = _save(tmp_path, nodes,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    for h, w in ((8, 8), (16, 4)):
        c = graph_cost(path, {"h": h, "w": w})
        conv = 4 * h * w * (3 * 3 * 3)           # outputs x (Cin x kh x kw)
        mm = h * w * 8 * 4                       # M x N x K
        assert c.macs == {"fp32": conv + mm} and c.unknown_shapes == 0
        assert c.weight_bytes == 4 * (4 * 3 * 3 * 3 + 4 * 8)   # the folded shape ints: none
        assert c.io_bytes == 4 * (3 * h * w + h * w * 8)
        assert c.input_float_values == 3 * h * w          # what the host prepares
        assert c.nodes == 4                      # Shape / Slice / Concat folded away


def test_gemm_qdq_int8_and_4bit_and_gemv_precisions(tmp_path):
    k, n = 64, 32
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "sc", "zp"], ["wd"], axis=0),
        helper.make_node("MatMul", ["a", "wd"], ["y1"]),                      # QDQ -> int8
        helper.make_node("MatMulNBits", ["a", "wb", "ws"], ["y2"], domain="com.microsoft",
                         K=k, N=n, bits=4, block_size=32),                     # 4-bit
        helper.make_node("Gemm", ["a", "gw"], ["y3"], transB=1),              # fp32
    ]
    inits = [numpy_helper.from_array(np.zeros((k, n), np.int8), "wq"),
             numpy_helper.from_array(np.ones(n, np.float32), "sc"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zp"),
             numpy_helper.from_array(np.zeros((n, k // 32, 16), np.uint8), "wb"),
             numpy_helper.from_array(np.ones(n * k // 32, np.float32), "ws"),
             _w("gw", n, k)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in (1, 2, 3)]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT,
                                                                 ["m", k])], outs, inits, ms=True)
    c = graph_cost(path, {"m": 100})
    assert c.macs == {"int8": 100 * k * n, "int4": 100 * k * n, "fp32": 100 * k * n}
    c1 = graph_cost(path, {"m": 1})                # one row: matrix-vector kernels
    assert c1.macs == {"int8:gemv": k * n, "int4:gemv": k * n, "fp32:gemv": k * n}
    assert c.nodes == 3                            # the weight's DequantizeLinear is fused
    nodes[2] = helper.make_node("MatMulNBits", ["a", "wb", "ws"], ["y2"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=32, accuracy_level=4)
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT,
                                                                 ["m", k])], outs, inits,
                 name="a4.onnx", ms=True)
    c4 = graph_cost(path, {"m": 1})                # int8 activations: int8 dot products
    assert c4.macs == {"int8:gemv": 2 * k * n, "fp32:gemv": k * n}
    assert c4.weight_bytes == c1.weight_bytes      # still the 4-bit weights that are read
    assert graph_cost(path, {"m": 100}).macs == c.macs   # GEMMs: the int4 kernel's own rate


def test_an_embedding_lookup_reads_its_rows_not_its_table(tmp_path):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["y"])]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                 ["b", "s"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                 [_w("table", 1000, 16), _w("w", 16, 4)])
    c = graph_cost(path, {"b": 1, "s": 3})
    assert c.weight_bytes == 3 * 16 * 4 + 16 * 4 * 4
    assert c.macs == {"fp32:gemv": 3 * 4 * 16}                     # 3 rows: a GEMV
    from pcbedge.plan.graph_cost import weight_bytes_of
    assert weight_bytes_of(path) == (1000 * 16 + 16 * 4) * 4     # resident: the whole table


def test_an_fp16_engine_lowers_the_float_graph(tmp_path):
    """float_precision "fp16" (TensorRT's fp16 flag): a float32 graph's MACs count at fp16 and
    its weights and intermediates at 2 bytes; int8 and 4-bit nodes and the graph's declared
    inputs / outputs are unchanged."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                 ["b", "s"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                 [_w("table", 1000, 16), _w("w", 16, 64)])
    dims = {"b": 1, "s": 300}
    c32, c16 = graph_cost(path, dims), graph_cost(path, dims, "fp16")
    assert c32.macs == {"fp32": 300 * 64 * 16} and c16.macs == {"fp16": 300 * 64 * 16}
    assert c32.weight_bytes == 300 * 16 * 4 + 16 * 64 * 4
    assert c16.weight_bytes == 300 * 16 * 2 + 16 * 64 * 2
    assert c16.activation_sizes == [300 * 16 * 2, 300 * 64 * 2]    # e, h (y is an output)
    assert c16.io_bytes == c32.io_bytes == 300 * 8 + 300 * 64 * 4
    from pcbedge.plan.graph_cost import weight_bytes_of
    assert weight_bytes_of(path, "fp16") == (1000 * 16 + 16 * 64) * 2
    # a 4-bit node keeps its precision and its bytes under the fp16 engine
    q = [helper.make_node("MatMulNBits", ["x", "wq", "sc"], ["y"], domain="com.microsoft",
                          K=64, N=32, bits=4, block_size=32)]
    path = _save(tmp_path, q, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                 [_w("wq", 32, 2, 16, dtype=np.uint8), _w("sc", 32 * 2)], name="q.onnx", ms=True)
    q16 = graph_cost(path, {"m": 100}, "fp16")
    assert q16.macs == {"int4": 100 * 32 * 64}
    assert q16.weight_bytes == 32 * 2 * 16 + 32 * 2 * 2


def test_the_tensorrt_modules_plan_float_graphs_in_fp16_fused():
    for name in ("agx-orin-64gb", "orin-nx-16gb", "orin-nano-8gb"):
        hw = load_target(name).hardware
        assert hw.float_precision == "fp16" and hw.fused_engine, name
    hw = load_target("x86-cpu").hardware
    assert hw.float_precision == "fp32" and not hw.fused_engine


def test_a_fused_engine_moves_only_weight_gemm_outputs(tmp_path):
    """fused_engine: attention scores, softmax and element-wise results stay on chip; the
    outputs of GEMMs with a constant weight (initializer, or Q/DQ of one) are what move."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),             # weight GEMM: moves
             helper.make_node("Relu", ["q"], ["qr"]),                     # element-wise
             helper.make_node("Transpose", ["qr"], ["kt"], perm=[1, 0]),
             helper.make_node("MatMul", ["qr", "kt"], ["s"]),             # scores: on chip
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "qr"], ["a"]),              # attention output
             helper.make_node("DequantizeLinear", ["wo_q", "sc"], ["wo"]),
             helper.make_node("MatMul", ["a", "wo"], ["h"]),              # Q/DQ weight GEMM
             helper.make_node("Add", ["h", "x"], ["y"])]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                 ["n", 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                 [_w("wq", 8, 8), _w("wo_q", 8, 8, dtype=np.int8),
                  numpy_helper.from_array(np.array(0.1, np.float32), "sc")])
    n = 100
    full, fused = graph_cost(path, {"n": n}), graph_cost(path, {"n": n}, fused=True)
    assert fused.activation_sizes == [n * 8 * 4, n * 8 * 4]              # q and h only
    assert fused.activation_bytes == 2 * 2 * n * 8 * 4
    assert n * n * 4 in full.activation_sizes                            # unfused: scores move
    assert fused.macs == full.macs and fused.weight_bytes == full.weight_bytes


def test_roofline_arithmetic_and_cache(tmp_path):
    from pcbedge.plan import _call_ms
    from pcbedge.plan.graph_cost import GraphCost
    hw = load_target("agx-orin-64gb").hardware
    cost = GraphCost(macs={"fp16": 10 ** 12}, weight_bytes=2 * 10 ** 9, nodes=10)
    t = _call_ms(cost, hw)
    assert t["compute_floor_ms"] == pytest.approx(2e12 / 42.6e12 * 1e3)
    assert t["memory_floor_ms"] == pytest.approx(2e9 / 204.8e9 * 1e3)
    assert t["predicted_ms"] == pytest.approx(t["compute_floor_ms"] / hw.efficiency_compute)
    assert t["bound"] == "compute"
    small = GraphCost(macs={"fp32": 10}, weight_bytes=1 << 20, io_bytes=100,
                      activation_sizes=[1 << 10, 64 << 20])
    assert small.dram_bytes(32 << 20) == 100 + 2 * (64 << 20)      # weights stay cached
    assert small.dram_bytes(0) == (1 << 20) + 100 + small.activation_bytes


def test_a_precision_with_its_own_compute_efficiency():
    """efficiency_compute_by_precision: the int4 GEMMs at their own factor, the int4
    matrix-vector products and every other precision at efficiency_compute."""
    from dataclasses import replace
    from pcbedge.plan import _call_ms
    from pcbedge.plan.graph_cost import GraphCost
    base = load_target("x86-cpu").hardware
    hw = replace(base, gemv_tops={"int4": 0.1}, efficiency_compute=0.5,
                 efficiency_compute_by_precision={"int4": 0.8})
    assert (hw.efficiency("int4"), hw.efficiency("int4:gemv"), hw.efficiency("fp32")) == \
        (0.8, 0.5, 0.5)
    cost = GraphCost(macs={"int4": 10 ** 11, "fp32": 10 ** 9, "int4:gemv": 10 ** 8})
    t = _call_ms(cost, hw)
    by = t["compute_floor_by_ms"]
    assert sum(by.values()) == pytest.approx(t["compute_floor_ms"])
    assert t["predicted_ms"] == pytest.approx(by["int4"] / 0.8 + by["fp32"] / 0.5
                                              + by["int4:gemv"] / 0.5)
    assert _call_ms(cost, replace(hw, efficiency_compute_by_precision={}))["predicted_ms"] == \
        pytest.approx(t["compute_floor_ms"] / 0.5)


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    pytest.importorskip("torch")
    from pcbedge.export.exporter import export_model
    from pcbedge.recipes.build import build_bundle
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm
    root = tmp_path_factory.mktemp("plan")
    export = export_model(tiny_pcbvlm(root), root / "export", check=False, progress=False)
    built = build_bundle("x86-cpu", export, root / "x86-cpu", progress=False)
    return export, built


@pytest.mark.covers("pcbvlm", "plan")
def test_plan_of_a_tiny_pcbvlm_bundle(tiny_bundles):
    from pcbedge.plan import plan_bundle
    export, built = tiny_bundles
    p = plan_bundle(built)                               # its own target: x86-cpu
    assert p["target"] == "x86-cpu" and p["family"] == "pcbvlm"
    m = json.loads((built / "manifest.json").read_text())
    vision = graph_cost(built / "vision.onnx", {"batch": 1, "height": m["input_size"],
                                                "width": m["input_size"]})
    assert p["stages"]["vision"]["macs"] == vision.macs
    assert "int8" in p["stages"]["vision"]["macs"]                      # the QDQ convs
    # preprocessing: the host writes the vision input [1, 3, S, S] (board, template, diff)
    values = 3 * m["input_size"] ** 2
    assert p["typical_answer"]["host_values"] == values
    ns = load_target("x86-cpu").hardware.host_ns_per_value
    assert p["stages"]["preprocess"]["predicted_ms"] == pytest.approx(values * ns * 1e-6)
    assert p["predicted_p50_ms"] == pytest.approx(sum(s["predicted_ms"]
                                                      for s in p["stages"].values()))
    assert p["meets_budget"] == (p["predicted_p50_ms"] <= 300.0)
    less = plan_bundle(built, typical={"keep_ratio": 0.25})
    assert less["stages"]["prefill"]["macs_total"] < p["stages"]["prefill"]["macs_total"]
    assert less["stages"]["vision"]["macs_total"] == p["stages"]["vision"]["macs_total"]
    for name in ("orin-nano-8gb", "agx-orin-64gb"):      # an export planned on other targets
        assert plan_bundle(export, name)["target"] == name
    slow, fast = (plan_bundle(export, n)["predicted_p50_ms"]
                  for n in ("orin-nano-8gb", "agx-orin-64gb"))
    assert fast < slow


@pytest.mark.covers(["qwen2_vl", "qwen2_5_vl"], "plan")
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_plan_of_a_tiny_qwen_bundle(tmp_path, variant):
    pytest.importorskip("transformers")
    from pcbedge.export.exporter import export_model
    from pcbedge.plan import plan_bundle
    from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl
    export = export_model(tiny_qwen2_vl(tmp_path, variant), tmp_path / "export", check=False,
                          progress=False)
    p = plan_bundle(export, "x86-cpu", typical={"new_tokens": 8})
    assert p["typical_answer"]["decode_tokens"] == 8
    # preprocessing: per image, n_patches rows of pixel values (3 x temporal 2 x patch^2) and
    # of rotary angles (head_dim / 2), both written by the host
    m = json.loads((export / "manifest.json").read_text())
    v, n_tok = m["vision"], m["visual_tokens"]
    n_patches = n_tok * v["spatial_merge_size"] ** 2
    per_image = n_patches * (3 * 2 * v["patch_size"] ** 2 + v["head_dim"] // 2)
    assert p["typical_answer"]["host_values"] == 2 * per_image
    assert p["stages"]["preprocess"]["predicted_ms"] == pytest.approx(
        2 * per_image * load_target("x86-cpu").hardware.host_ns_per_value * 1e-6)
    assert p["stages"]["decode"]["calls"][-1]["count"] == 8
    assert all(c["unknown_shapes"] == 0 for s in p["stages"].values() for c in s["calls"])
    longer = plan_bundle(export, "x86-cpu", typical={"new_tokens": 32})
    assert longer["stages"]["decode"]["predicted_ms"] > p["stages"]["decode"]["predicted_ms"]


def test_every_shipped_target_can_plan():
    """Coverage over targets: each has [hardware], or is the shared recipe the module
    profiles extending it complete."""
    extended = {}
    for path in (REPO / "pcbedge" / "targets").glob("*.toml"):
        text = path.read_text()
        for line in text.splitlines():
            if line.startswith("extends"):
                extended.setdefault(line.split('"')[1], []).append(path.stem)
    for t in list_targets():
        if t.hardware is None:
            kids = [load_target(n) for n in extended.get(t.name, [])]
            assert kids and all(k.hardware is not None for k in kids), t.name
        else:
            assert t.hardware.source and t.hardware.calibration, t.name


BASE = {"name": "t", "description": "d", "arch": "x86_64", "runtime": "onnxruntime",
        "providers": ["CPUExecutionProvider"], "latency_budget_ms": 100.0,
        "precision": {"vision": "fp32", "decoder": "fp32"},
        "quantization": {"scheme": "none"}, "pruning": {"method": "none"}, "shapes": {}}
HW = {"device": "d", "peak_tops": {"fp32": 1.0}, "memory_bandwidth_gbs": 10.0,
      "memory_gb": 8.0, "source": "s", "calibration": "c"}


@pytest.mark.parametrize("field,value", [
    ("peak_tops", {"fp64": 1.0}), ("peak_tops", {"fp32": -1}), ("peak_tops", {}),
    ("memory_bandwidth_gbs", 0), ("efficiency_compute", 1.5), ("memory_reserved_gb", 9.0),
    ("gemv_tops", {"int3": 1.0}), ("efficiency_compute_by_precision", {"int4": 1.5}),
    ("efficiency_compute_by_precision", {"int3": 0.5}), ("source", ""), ("bogus", 1), ("float_precision", "int8"),
    ("float_precision", 16), ("fused_engine", "yes")])
def test_bad_hardware_fields_are_refused(field, value):
    with pytest.raises(TargetError, match=f"hardware.{field}"):
        parse_profile({**BASE, "hardware": {**HW, field: value}})


def test_profile_extends(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\n' + (REPO / "pcbedge/targets/x86-cpu.toml"
                                        ).read_text().split("\n", 3)[3])
    (tmp_path / "kid.toml").write_text('extends = "base"\nname = "kid"\nlatency_budget_ms = 50.0\n'
                                       '[hardware]\ndevice = "d"\npeak_tops = { fp32 = 1.0 }\n'
                                       'memory_bandwidth_gbs = 5.0\nmemory_gb = 4.0\n'
                                       'source = "s"\ncalibration = "c"\n')
    kid = load_target(tmp_path / "kid.toml")
    assert kid.latency_budget_ms == 50.0 and kid.hardware.memory_gb == 4.0
    assert kid.precision == load_target("x86-cpu").precision
    (tmp_path / "loop.toml").write_text('extends = "loop"\nname = "loop"\n')
    with pytest.raises(TargetError, match="extends"):
        load_target(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text('extends = "nowhere"\nname = "orphan"\n')
    with pytest.raises(TargetError, match="nowhere"):
        load_target(tmp_path / "orphan.toml")


def test_cli_plan(tiny_bundles, tmp_path):
    export, built = tiny_bundles
    run = [sys.executable, "-m", "pcbedge", "plan"]
    out = tmp_path / "plan.json"
    r = subprocess.run([*run, str(built), "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "predicted P50" in r.stdout and json.loads(out.read_text())["kind"] == "pcbedge plan"
    r = subprocess.run([*run, str(built), "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0                              # its own plan file is replaced
    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    r = subprocess.run([*run, str(built), "--json", str(foreign)], capture_output=True, text=True)
    assert r.returncode == OutputError.exit_code and "never replaced" in r.stderr
    assert foreign.read_text() == "{}"
    r = subprocess.run([*run, str(export)], capture_output=True, text=True)   # no target
    assert r.returncode == TargetError.exit_code and "--target" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*run, str(export), "--target", "jetson-orin"], capture_output=True,
                       text=True)
    assert r.returncode == TargetError.exit_code and "[hardware]" in r.stderr
    from pcbedge.errors import BundleError
    r = subprocess.run([*run, str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == BundleError.exit_code and "not found" in r.stderr
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(built, broken)
    (broken / "vision.onnx").write_text("garbage")
    r = subprocess.run([*run, str(broken)], capture_output=True, text=True)
    assert r.returncode == BundleError.exit_code and "not an ONNX model" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_report_plan_block(tiny_bundles, monkeypatch):
    """The bench report's plan beside the measured stages; on a device install (no onnx) the
    block says why it is missing instead of failing the bench."""
    import importlib.util

    from pcbedge.benchmarks.harness import plan_vs_measured
    export, built = tiny_bundles
    report = {"latency_ms_by_stage": {"vision": {"p50": 10.0}, "decode": {"p50": 0.0}},
              "latency_ms": {"p50": 20.0}}
    block = plan_vs_measured(built, report)
    assert block["available"] and block["target"] == "x86-cpu"
    v = block["stages"]["vision"]
    assert v["error_pct"] == pytest.approx(100 * (v["predicted_ms"] - 10.0) / 10.0)
    assert block["stages"]["decode"]["error_pct"] is None          # nothing measured
    assert not plan_vs_measured(export, report)["available"]       # no target: the reason
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    block = plan_vs_measured(built, report)
    assert not block["available"] and "onnx" in block["reason"]


def test_inline_weights_are_counted_but_not_carried(tmp_path):
    """A built bundle holds its weights inline: their bytes count, their data is dropped before
    shape inference (which copies the model on every round: >10 min for a 2B bundle)."""
    k, n = 128, 64                                  # 8,192 elements: past the folding size
    nodes = [helper.make_node("MatMul", ["a", "w"], ["y"])]
    w = numpy_helper.from_array(np.ones((k, n), np.float32), "w")
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT,
                                                                 ["m", k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w],
                 name="inline.onnx")
    c = graph_cost(path, {"m": 10})
    assert c.weight_bytes == 4 * k * n and c.macs == {"fp32": 10 * k * n}
    from pcbedge.plan.graph_cost import _drop_weight_data, _load
    model = _load(path)
    _drop_weight_data(model)
    assert not model.graph.initializer[0].raw_data and list(model.graph.initializer[0].dims) \
        == [k, n]
