"""Graphs past protobuf's reach, as a 2B-class checkpoint makes them, on a tiny model: with the
external-data threshold at 0 every graph keeps its weights in a side-car ``.data`` file through
export (never read back into memory), build (static INT8 vision, 4-bit decoder: the quantizers
read and write side-cars) and bench (``max_new_tokens``). Also: a user's profile that
``extends`` a shipped target from another folder (benchmarks/real_size/x86-cpu-int4.toml)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from pcbedge import api  # noqa: E402
from pcbedge.bundle.manifest import read_manifest, verify_files  # noqa: E402
from pcbedge.errors import TargetError  # noqa: E402
from pcbedge.targets import load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INT4_PROFILE = ROOT / "benchmarks" / "real_size" / "x86-cpu-int4.toml"
INT8_PROFILE = ROOT / "benchmarks" / "real_size" / "x86-cpu-int8.toml"
OPEN_GATES = {"p95_ms_max": 1e9, "max_map_drop": 1.0, "max_count_drop": 1.0,
              "max_hallucination_rise": 1e9, "min_map": 0.0, "max_question_drop": 1.0}


@pytest.fixture(scope="module")
def side_car_export(tmp_path_factory):
    from pcbedge.bundle import graph_io
    from pcbedge.export import exporter
    from pcbedge.recipes import build
    from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl

    mp = pytest.MonkeyPatch()
    mp.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)
    mp.setattr(graph_io, "EXTERNAL_DATA_BYTES", 0)
    mp.setattr(build, "LINK_BYTES", 0)          # every export file hard-linked into the stage
    root = tmp_path_factory.mktemp("large")
    export = api.export_model(tiny_qwen2_vl(root), root / "export", check_boards=0,
                              parity_sizes=[(56, 84)], progress=False)
    yield root, export
    mp.undo()


@pytest.mark.covers("qwen2_vl", "export")
def test_export_keeps_the_exporters_side_cars(side_car_export):
    _, export = side_car_export
    m = read_manifest(export)
    assert m["parity"]["passed"] is True
    for role in ("vision", "decoder"):
        f = m["graphs"][role]["file"]
        assert f + ".data" in m["files"], role
        assert (export / f).stat().st_size < (export / f"{f}.data").stat().st_size
    steps = m["export_peak_rss_mb"]
    assert set(steps) >= {"load model", "export vision", "export decoder", "parity"}
    assert all(v > 0 for v in steps.values())
    values = list(steps.values())
    assert values == sorted(values)                      # peaks so far: never down


@pytest.mark.covers("qwen2_vl", "build", "x86-cpu")
def test_build_reads_and_writes_side_cars(side_car_export):
    import onnx

    root, export = side_car_export
    before = read_manifest(export)
    out = api.build_bundle(str(INT4_PROFILE), export, root / "int4", progress=False)
    verify_files(export, before)      # linked, never written through: the export is intact
    m = read_manifest(out)
    verify_files(out, m)
    assert (out / "embed.onnx").stat().st_ino == (export / "embed.onnx").stat().st_ino
    assert m["precision"] == {"vision": "int8", "decoder": "int4"}
    assert len(m["calibration"]["boards"]) <= 8
    for role, op in (("vision", "QuantizeLinear"), ("decoder", "MatMulNBits")):
        f = m["graphs"][role]["file"]
        assert f + ".data" in m["files"], role        # threshold 0: the quantizer's side-car
        ops = {n.op_type for n in onnx.load(str(out / f)).graph.node}
        assert op in ops, role
    from onnx import helper
    nbits = [n for n in onnx.load(str(out / "decoder.onnx")).graph.node
             if n.op_type == "MatMulNBits"]
    assert {helper.get_attribute_value(a) for n in nbits for a in n.attribute
            if a.name == "accuracy_level"} == {4}          # int4_compute = "int8"
    assert m["quantization"]["graphs"]["decoder"]["config"]["compute"] == "int8"
    drift = m["quantization"]["groups"]["decoder"]["drift_vs_fp32"]
    assert 0 <= drift["first_logits_rel_l2"] < 0.5
    runner = api.load_runner(out, threads=1)
    from pcbedge.families.qwen_vl.parity import random_board
    ans = runner.ask(random_board(112, 112, seed=1), random_board(112, 112, seed=2),
                     "where are the defects?", max_new_tokens=4)
    assert 1 <= len(ans["token_ids"]) <= 4


@pytest.mark.covers("qwen2_vl", "bench")
def test_bench_caps_the_answer_length(side_car_export, tmp_path):
    root, export = side_car_export
    bundle = root / "int4"
    if not (bundle / "manifest.json").is_file():
        api.build_bundle(str(INT4_PROFILE), export, bundle, progress=False)
    report = api.run_benchmark(bundle, out_dir=tmp_path / "b", gates=OPEN_GATES, queries=2,
                               min_seconds=0.0, warmup=0, max_boards=1, progress=False,
                               max_new_tokens=3, resume=True)
    assert report["workload"]["max_new_tokens"] == 3
    lines = (tmp_path / "b" / "answers" / "bundle.jsonl").read_text().splitlines()[1:]
    lengths = [len(a["token_ids"]) for line in lines for a in json.loads(line)["answers"]]
    assert lengths and max(lengths) <= 3      # random weights run to the cap: 3, not 64
    with pytest.raises(Exception, match="max_new_tokens 0"):
        api.run_benchmark(bundle, out_dir=tmp_path / "c", max_new_tokens=0, progress=False)


def test_int8_profile_quantizes_the_tied_head_through_side_cars(side_car_export):
    """The dynamic INT8 decoder: the head's Gemm is rewritten to MatMul first (onnxruntime's
    dynamic quantizer takes no Gemm), through a temporary graph that does not outlive it."""
    import onnx

    root, export = side_car_export
    out = api.build_bundle(str(INT8_PROFILE), export, root / "int8", progress=False)
    m = read_manifest(out)
    verify_files(out, m)
    assert m["precision"] == {"vision": "int8", "decoder": "int8"}
    assert m["quantization"]["graphs"]["vision"]["config"]["weight_type"] == "int8"
    ops = [n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node]
    assert "MatMulInteger" in ops and "Gemm" not in ops
    assert not [p.name for p in out.rglob("*matmul*")]     # the rewrite's temporary is gone


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "real_size").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_real_size_profile_loads_with_hardware(path):
    p = load_profile(path).for_family("qwen_vl")
    assert p.hardware is not None and p.hardware.peak_tops and p.hardware.source


def test_a_profile_extends_a_shipped_target_from_anywhere(tmp_path):
    p = load_profile(INT4_PROFILE).for_family("qwen_vl")
    assert p.precision.decoder == "int4" and p.threads == 2     # the rest is x86-cpu's
    mine = tmp_path / "line-7.toml"
    mine.write_text('name = "line-7"\nextends = "x86-cpu"\nlatency_budget_ms = 250.0\n'
                    '[gates]\np95_ms_max = 250.0\n')
    got = load_profile(mine)
    assert got.latency_budget_ms == 250.0 and got.precision.vision == "int8"
    mine.write_text('name = "line-7"\nextends = "no-such-target"\n')
    with pytest.raises(TargetError, match="no-such-target"):
        load_profile(mine)


@pytest.mark.parametrize("trans_b, bias", [(1, False), (0, True), (1, True)])
def test_gemm_heads_become_matmuls_exactly(trans_b, bias):
    """A tied LM head comes out of the exporter as Gemm(x, W, transB=1): rewritten to MatMul
    (+ Add) so the 4-bit quantizer takes it; the same outputs, to float rounding."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pcbedge.recipes.weights import gemms_as_matmuls

    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 8) if trans_b else (8, 12)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "C"))
        ins.append("C")
    node = helper.make_node("Gemm", ins, ["y"], transB=trans_b)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 12])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8)).astype(np.float32)

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x})[0]

    want = run(model)
    assert gemms_as_matmuls(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul"] + (["Add"] if bias else [])
    onnx.checker.check_model(model)
    np.testing.assert_allclose(run(model), want, rtol=1e-6, atol=1e-6)


def test_matmul_copy_reads_only_the_gemm_weights(tmp_path):
    """The dynamic INT8 path's rewrite of a side-car graph: the Gemm head read and written to
    its own side-car, every other weight copied file to file; same outputs, source intact."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pcbedge.recipes.weights import matmul_copy

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)).astype(np.float32)
    head = rng.standard_normal((4160, 64)).astype(np.float32)       # just over 1 MiB
    big = rng.standard_normal((64, 8192)).astype(np.float32)         # 2 MiB, the side-car's
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["u"]),
             helper.make_node("Gemm", ["h", "E"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4160]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, 8192])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (head, "E"), (big, "B"))])
    src = tmp_path / "src" / "decoder.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src),
              save_as_external_data=True, location="decoder.onnx.data", size_threshold=0)
    before = (src.parent / "decoder.onnx.data").read_bytes()
    out = matmul_copy(src, tmp_path / "scratch")
    assert out == tmp_path / "scratch" / "decoder.onnx"
    assert (src.parent / "decoder.onnx.data").read_bytes() == before
    assert (tmp_path / "scratch" / "decoder.onnx.data").read_bytes() == before
    assert (tmp_path / "scratch" / "decoder.onnx.matmul.data").stat().st_size >= head.nbytes
    model = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul", "MatMul"]
    onnx.checker.check_model(str(out), full_check=True)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], (x @ w1) @ head.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[1], (x @ w1) @ big, rtol=1e-5, atol=1e-4)
    assert matmul_copy(out, tmp_path / "again") is None      # no Gemm left: nothing to do


@pytest.mark.parametrize("head", [True, False])
def test_int4_head_false_keeps_the_output_projection_float(tmp_path, head):
    """``int4_head = false``: the MatMul that writes the graph output (a tied head, exported as
    Gemm) stays float, as AWQ tools leave it; every other constant-weight MatMul is 4-bit."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pcbedge.recipes.configs import WeightOnlyInt4Config
    from pcbedge.recipes.weights import quantize_int4_weights

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32), "E"),
             numpy_helper.from_array(np.array([1, 256], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mlp"),
             helper.make_node("Gemm", ["h", "E"], ["z"], name="head", transB=1),
             helper.make_node("Reshape", ["z", "shape"], ["logits"], name="r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             [1, 256])], inits)
    src, dst = tmp_path / "d.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    rep = quantize_int4_weights(src, dst, WeightOnlyInt4Config(head=head))
    ops = {n.output[0]: n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ops["z"] == ("MatMulNBits" if head else "MatMul") and ops["h"] == "MatMulNBits"
    assert rep["nodes"] == ({"MatMulNBits": 2} if head else {"MatMulNBits": 1, "MatMul": 1})
