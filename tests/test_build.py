"""build_bundle over every shipped target, Q/DQ placement, atomicity and refusals (tiny model)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import pcbedge.recipes.build as build_mod
from pcbedge.recipes.build import build_bundle
from pcbedge.recipes.configs import StaticInt8Config
from pcbedge.recipes.quantize import quantize_graph
from pcbedge.recipes.report import qdq_report
from pcbedge.recipes.tensorrt import ENGINES_DEFERRED, import_tensorrt
from pcbedge.calibration import select_calibration_set
from pcbedge.families.pcbvlm.recipe import iter_vision_inputs
from pcbedge.errors import BundleError, CalibrationError, OutputError, TargetError
from pcbedge.bundle.manifest import read_manifest, sha256_file, verify_files
from pcbedge.targets import list_targets
from pcbedge.testing import tiny_bundle

torch.set_num_threads(1)
TARGETS = [p.name for p in list_targets()]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]


@pytest.fixture(scope="module")
def cal_set(sample_data):
    return select_calibration_set(sample_data)


@pytest.fixture(scope="module")
def built(export, tmp_path_factory) -> dict[str, Path]:
    """Every shipped target built once from the tiny export."""
    root = tmp_path_factory.mktemp("built")
    return {t: build_bundle(t, export, root / t, progress=False) for t in TARGETS}


# --- Q/DQ placement -----------------------------------------------------------------------------

def test_vision_qdq_sits_on_convs_only(export, cal_set, tmp_path):
    cfg = StaticInt8Config(op_types=("Conv",))
    rep = quantize_graph(export / "vision.onnx", tmp_path / "v8.onnx", cfg,
                         iter_vision_inputs(cal_set, 128))
    assert rep["calibration_samples"] == 16
    assert rep["quantized_by_op_type"]["Conv"] >= 10
    assert not {"MatMul", "Gemm", "Sigmoid", "TopK"} & set(rep["quantized_by_op_type"])
    # the narrow head outputs (6 and 4 channels) stayed float, by name; the stem is int8
    assert len(rep["excluded_nodes"]) == 2 and rep["float_by_op_type"]["Conv"] == 2
    floats = {f["name"] for f in rep["float_nodes"]}
    assert set(rep["excluded_nodes"]) <= floats
    assert rep["weights"]["per_channel"] > 0 and rep["weights"]["per_tensor"] == 0
    # the export leaves one BN whose conv output is also read by a Shape node; the reroute lets
    # it fold into the conv instead of running float behind a quantized conv
    assert "BatchNormalization" not in rep["float_by_op_type"]
    assert rep["activations"] == {"dtypes": ["uint8"], "symmetric": False, "per_tensor": True}
    again = qdq_report(tmp_path / "v8.onnx")           # the report is a function of the graph
    assert again["quantized_by_op_type"] == rep["quantized_by_op_type"]
    # no tensor is dequantized only to read its shape: Shape reads the quantized tensor
    g = onnx.load(str(tmp_path / "v8.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    shapes = [n for n in g.node if n.op_type == "Shape"]
    assert shapes and all(producer.get(n.input[0]) is None
                          or producer[n.input[0]].op_type != "DequantizeLinear" for n in shapes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    assert all(n.output[0] in used for n in g.node if n.op_type == "DequantizeLinear")


def test_shape_reads_skip_qdq_is_exact(export, cal_set, tmp_path):
    import onnxruntime as ort
    from pcbedge.recipes import quantize as q
    cfg = StaticInt8Config(op_types=("Conv",))
    outs = {}
    for name, reroute in (("plain", lambda m: 0), ("rerouted", q.shape_reads_skip_qdq)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(q, "shape_reads_skip_qdq", reroute)
            quantize_graph(export / "vision.onnx", tmp_path / f"{name}.onnx", cfg,
                           iter_vision_inputs(cal_set, 128))
        s = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        x = next(iter_vision_inputs(cal_set, 128))
        outs[name] = s.run(None, x)
    for a, b in zip(outs["plain"], outs["rerouted"]):
        np.testing.assert_array_equal(a, b)


def test_gathers_read_quantized_is_exact(export, cal_set, tmp_path):
    """The region features are gathered from the int8 stride-4 map and only the gathered
    values dequantized: same outputs bit for bit, and no full-map DequantizeLinear left."""
    import onnxruntime as ort
    cfg = StaticInt8Config(op_types=("Conv", "Relu"))
    outs, graphs = {}, {}
    for name, on in (("plain", False), ("moved", True)):
        quantize_graph(export / "vision.onnx", tmp_path / f"{name}.onnx",
                       replace(cfg, gather_quantized=on), iter_vision_inputs(cal_set, 128))
        graphs[name] = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        s = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        outs[name] = s.run(None, next(iter_vision_inputs(cal_set, 128)))
    for a, b in zip(outs["plain"], outs["moved"]):
        np.testing.assert_array_equal(a, b)

    def gathers_after_dq(g):
        producer = {o: n for n in g.node for o in n.output}
        n_after = 0
        for n in g.node:
            x = n.input[0] if n.op_type == "GatherElements" else None
            while x in producer and producer[x].op_type == "Reshape":
                x = producer[x].input[0]
            n_after += x in producer and producer[x].op_type == "DequantizeLinear"
        return n_after
    assert gathers_after_dq(graphs["plain"]) >= 1
    assert gathers_after_dq(graphs["moved"]) == 0
    assert any(n.op_type == "DequantizeLinear" and n.name.endswith("_dequantize")
               for n in graphs["moved"].node)


def test_score_bias_is_recorded_and_skipped_without_heldout_boards(built):
    """x86-cpu asks for the score bias correction; the sample's calib.txt holds only the 16
    calibration boards, so the build says it skipped and why, in the manifest."""
    from pcbedge.targets import load_target
    assert load_target("x86-cpu").quantization.score_bias_boards > 0
    rec = read_manifest(built["x86-cpu"])["quantization"]["graphs"]["vision"]["score_bias"]
    assert rec["applied"] is False and "0 board(s) beyond the 16" in rec["reason"]
    assert read_manifest(built["x86-cuda"])["quantization"] is None


def test_score_bias_applied_with_heldout_boards(export, sample_data, tmp_path):
    """With trainval.txt (64 boards) and 16 calibration boards (x86-cpu asks for 64: a profile
    extending it asks for 16), the sample has 48 boards beyond the calibration set: the
    correction runs on them (8 views each) and folds the offset into the heat conv's bias."""
    import shutil

    from pcbedge.targets import TARGETS_DIR
    shutil.copyfile(TARGETS_DIR / "x86-cpu.toml", tmp_path / "x86-cpu.toml")
    (tmp_path / "cal16.toml").write_text('extends = "x86-cpu"\nname = "cal16"\n'
                                         '[quantization]\ncalibration_boards = 16\n')
    out = build_bundle(str(tmp_path / "cal16.toml"), export, tmp_path / "b",
                       calibration=sample_data, calibration_list="trainval.txt",
                       progress=False)
    m = read_manifest(out)
    rec = m["quantization"]["graphs"]["vision"]["score_bias"]
    assert len(rec["boards"]) == 48 and rec["views"] == 48 * 8
    assert not set(rec["boards"]) & set(m["calibration"]["boards"])
    assert m["calibration"]["list_file"] == "trainval.txt"
    assert rec["applied"] is True and rec["matched"] >= 30 and rec["conv"]
    assert rec["band"][0] < 0.5 < rec["band"][1] and rec["stderr"] > 0


def test_softmax_never_quantized(export, tmp_path):
    rng = np.random.default_rng(0)
    m = read_manifest(export)
    d = m["graphs"]["decoder_prefill"]["inputs"][0]["shape"][2]
    k = m["num_regions"]
    feeds = ({"visual_tokens": rng.standard_normal((1, 16, d)).astype(np.float32),
              "region_tokens": rng.standard_normal((1, k, d)).astype(np.float32),
              "input_ids": rng.integers(0, 100, (1, 7)).astype(np.int64)} for _ in range(4))
    cfg = StaticInt8Config(op_types=("MatMul", "Gemm"))
    rep = quantize_graph(export / "decoder_prefill.onnx", tmp_path / "p8.onnx", cfg, feeds)
    softmax = [f for f in rep["float_nodes"] if f["op_type"] == "Softmax"]
    assert softmax and all(not f["dq_inputs"] and not f["q_output"] for f in softmax)
    assert "Softmax" not in rep["quantized_by_op_type"]
    assert "LayerNormalization" not in rep["quantized_by_op_type"]
    assert rep["quantized_by_op_type"].get("MatMul", 0) + rep["quantized_by_op_type"].get(
        "Gemm", 0) > 0
    # attention MatMuls (no weight) stay float
    assert rep["float_by_op_type"].get("MatMul", 0) >= 2


def test_softmax_in_op_list_is_refused():
    with pytest.raises(TargetError, match="Softmax"):
        StaticInt8Config(op_types=("MatMul", "Softmax"))
    with pytest.raises(TargetError, match="calibration_method"):
        StaticInt8Config(calibration_method="kl")


def test_empty_calibration_iterator(export, tmp_path):
    with pytest.raises(CalibrationError, match="got no input"):
        quantize_graph(export / "vision.onnx", tmp_path / "x.onnx", StaticInt8Config(), iter(()))


# --- build_bundle over every shipped target (a coverage test: a new profile is tested too) -----

@pytest.mark.covers("pcbvlm", "build", "*")
@pytest.mark.parametrize("target", TARGETS)
def test_build_every_target(target, built, export):
    out = built[target]
    m = read_manifest(out)
    verify_files(out, m)
    profile = next(p for p in list_targets() if p.name == target)
    assert m["precision"] == {"vision": profile.precision.vision,
                              "decoder": profile.precision.decoder}
    assert m["target"]["name"] == target and m["target"]["arch"] == profile.arch
    assert m["reference"]["manifest_sha256"] == sha256_file(export / "manifest.json")
    assert Path(m["reference"]["export_dir"]) == export.resolve()
    assert m["pruning"]["method"] == profile.pruning.method
    assert m["pruning"]["keep_ratio"] == profile.pruning.keep_ratio
    assert m["input_size"] == profile.shapes.input_size == m["preprocess"]["input_size"]
    assert m["runtime"]["engine"] == profile.runtime
    if profile.precision.vision == "int8":
        placement = m["quantization"]["graphs"]["vision"]["placement"]
        assert placement["quantized_by_op_type"]["Conv"] > 0
        assert m["calibration"]["sha256"] == m["quantization"]["calibration_sha256"]
        # the embedded sample's calib.txt holds 16 boards: a profile asking for more gets those
        assert len(m["calibration"]["boards"]) == min(profile.quantization.calibration_boards, 16)
        drift = m["quantization"]["graphs"]["vision"]["drift_vs_fp32"]
        assert drift["visual_tokens"]["mean"] < 0.2
    else:
        assert m["quantization"] is None and m["calibration"] is None


@pytest.mark.parametrize("target", [t for t in TARGETS
                                    if next(p for p in list_targets() if p.name == t).runtime
                                    == "onnxruntime"])
def test_ort_bundle_loads_and_answers(target, built, sample_data, monkeypatch):
    import platform

    from pcbedge.recipes.tensorrt import host_arch
    from pcbedge.errors import HardwareMismatchError
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner

    m = read_manifest(built[target])
    providers = ["CPUExecutionProvider"]   # a CUDA target's graphs also run on the CPU here
    if m["target"]["arch"] != host_arch():
        with pytest.raises(HardwareMismatchError, match=m["target"]["arch"]):
            PcbVlmOnnxRunner(built[target], providers=providers, threads=1)
        # the graphs themselves are portable ONNX: pretend to be the target to run them
        monkeypatch.setattr(platform, "machine", lambda: m["target"]["arch"])
    runner = PcbVlmOnnxRunner(built[target], providers=providers, threads=1)
    board = (sample_data / "bench.txt").read_text().split()[0]
    stem = sample_data / Path(board).with_suffix("")
    ans = runner.ask(f"{stem}_test.jpg", f"{stem}_temp.jpg", "where are the defects?",
                     max_new_tokens=8)
    assert ans["token_ids"] and ans["info"]["visual_tokens_total"] == m["visual_tokens"]
    if m["pruning"]["method"] != "none":
        assert ans["info"]["visual_tokens_kept"] < ans["info"]["visual_tokens_total"]


@pytest.mark.parametrize("target", [t for t in TARGETS
                                    if next(p for p in list_targets() if p.name == t).runtime
                                    == "tensorrt"])
def test_tensorrt_bundle_deferred_files(target, built):
    out = built[target]
    m = read_manifest(out)
    assert m["trt_validation"]["blockers"] == 0
    assert m["quantization"]["graphs"]["vision"]["placement"]["activations"]["symmetric"]
    plan = json.loads((out / "trt" / "profiles.json").read_text())
    script = (out / "trt" / "build.sh").read_text()
    for role, g in plan["graphs"].items():
        assert f"--onnx={g['onnx']}" in script and f"--saveEngine=trt/{role}.engine" in script
    assert "--minShapes=visual_tokens:1x16x" in script and "x400x" in script
    assert "--memPoolSize=workspace:" in script and "--int8" in script and "--fp16" in script
    assert plan["axis_ranges"]["seq"] == [1, 16, 96]
    if import_tensorrt() is None:
        assert m["tensorrt"]["engines"] == ENGINES_DEFERRED
        assert "tensorrt is not installed" in m["tensorrt"]["deferred_reason"]
    else:
        pytest.skip("tensorrt is installed: the engine build is covered by the tensorrt tests")


# --- overrides, atomicity, refusals -------------------------------------------------------------

def test_keep_ratio_and_calibration_overrides(export, tmp_path, sample_data):
    from pcbedge.targets import load_target
    cal = tmp_path / "cal"
    shutil.copytree(sample_data, cal)
    (cal / "calib.txt").unlink()
    out = build_bundle("x86-cpu", export, tmp_path / "b", keep_ratio=0.25, calibration=cal,
                       progress=False)
    m = read_manifest(out)
    assert m["pruning"]["keep_ratio"] == 0.25
    # without calib.txt the whole sample (64 boards) is the source: up to the profile's count
    assert m["calibration"]["root"] == str(cal)
    assert len(m["calibration"]["boards"]) == min(
        load_target("x86-cpu").quantization.calibration_boards, 64)
    with pytest.raises(TargetError, match="does not prune"):
        build_bundle("x86-cuda", export, tmp_path / "c", keep_ratio=0.5, progress=False)
    with pytest.raises(CalibrationError, match="no statically calibrated graph"):
        build_bundle("x86-cuda", export, tmp_path / "d", calibration=cal, progress=False)


def test_interrupted_build_leaves_nothing(export, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "quantize_groups", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_bundle("x86-cpu", export, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_tampered_export_refused(export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    data = bytearray((copy / "decoder_step.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "decoder_step.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        build_bundle("x86-cpu", copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_built_bundle_is_not_an_export(built, tmp_path):
    with pytest.raises(BundleError, match="not a float export"):
        build_bundle("x86-cuda", built["x86-cpu"], tmp_path / "out", progress=False)


def test_out_dir_rules(export, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        build_bundle("x86-cuda", export, out, progress=False)
    assert (out / "keep.txt").is_file()
    with pytest.raises(OutputError, match="not a bundle made by pcbedge"):   # even overwrite
        build_bundle("x86-cuda", export, out, overwrite=True, progress=False)
    (out / "keep.txt").unlink()
    build_bundle("x86-cuda", export, out, progress=False)                   # empty: fine
    build_bundle("x86-cuda", export, out, overwrite=True, progress=False)   # a bundle: replaced
    assert (out / "manifest.json").is_file()
    with pytest.raises(OutputError, match="own export"):
        build_bundle("x86-cuda", export, export, overwrite=True, progress=False)


def test_unknown_target(export, tmp_path):
    with pytest.raises(TargetError, match="unknown target 'no-such-box'"):
        build_bundle("no-such-box", export, tmp_path / "out", progress=False)


def test_default_out_dir_and_progress(export, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = build_bundle("x86-cuda", export, progress=True)
    assert out == Path("bundles") / "x86-cuda" and (tmp_path / out / "manifest.json").is_file()
    assert "[pcbedge build]" in capsys.readouterr().err
