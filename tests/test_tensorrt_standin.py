"""The TensorRT path without TensorRT: engine-build code against a STAND-IN of the tensorrt API,
the loader's hardware check, and the static parser checks.

The stand-in below is not TensorRT: it records the calls pcbedge makes (network, parser,
builder config, optimisation profiles) and returns fake engine bytes. It proves the code path
and its arguments, not that real TensorRT accepts them; docs/build.md says so too.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import pcbedge.recipes.tensorrt as trt_mod
from pcbedge.recipes.build import build_bundle
from pcbedge.recipes.tensorrt import (ENGINES_BUILT, ENGINES_DEFERRED, check_engine_compat,
                                    plan_engines)
from pcbedge.recipes.trt_ops import check_graph, check_graphs, raise_on_blockers
from pcbedge.errors import ExportError, HardwareMismatchError
from pcbedge.bundle.manifest import read_manifest
from pcbedge.targets import list_targets, load_target
from pcbedge.testing import tiny_bundle

torch.set_num_threads(1)
TRT_TARGETS = [p.name for p in list_targets() if p.runtime == "tensorrt"]


def make_standin(version: str = "10.3.0", parse_ok: bool = True) -> types.ModuleType:
    """A fake ``tensorrt`` module (named as a stand-in) that records what it is asked to do."""
    mod = types.ModuleType("tensorrt")
    mod.__doc__ = "STAND-IN for the tensorrt package (tests only; builds nothing real)"
    mod.__version__ = version
    mod.calls = {"networks": [], "configs": [], "profiles": [], "parsed": []}

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            self.level = level

    class Network:
        def __init__(self, flags):
            self.flags = flags
            mod.calls["networks"].append(self)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            mod.calls["parsed"].append(Path(path).name)
            assert onnx.load(path) is not None
            return parse_ok

        def get_error(self, i):
            return "In node 0 (importTopK): UNSUPPORTED_NODE (stand-in error)"

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = [], {}, []
            self.builder_optimization_level = None
            mod.calls["configs"].append(self)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def __init__(self):
            self.shapes = {}
            mod.calls["profiles"].append(self)

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"STAND-IN ENGINE " + ",".join(config.flags).encode()

    mod.Logger, mod.Builder, mod.OnnxParser = Logger, Builder, OnnxParser
    mod.BuilderFlag = types.SimpleNamespace(INT8="INT8", FP16="FP16")
    mod.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    return mod


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]


@pytest.fixture
def standin(monkeypatch):
    """Inject the stand-in as ``tensorrt`` on a host that looks like the target device."""
    fake = make_standin()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "gpu_info", lambda: ("Orin (stand-in)", "8.7"))
    monkeypatch.setattr(trt_mod, "host_arch", lambda: "aarch64")
    return fake


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_engines_built_with_standin(target, export, standin, tmp_path):
    out = build_bundle(target, export, tmp_path / "b", progress=False)
    m = read_manifest(out)
    profile = load_target(target)
    t = m["tensorrt"]
    assert t["engines"] == ENGINES_BUILT
    assert t["built_with"] == {"gpu": "Orin (stand-in)", "compute_capability": "8.7",
                               "tensorrt_version": "10.3.0"}
    assert standin.calls["parsed"] == ["vision.onnx", "decoder_prefill.onnx",
                                       "decoder_step.onnx"]
    configs = dict(zip(["vision", "decoder_prefill", "decoder_step"], standin.calls["configs"]))
    assert configs["vision"].flags == ["INT8", "FP16"]          # explicit Q/DQ int8
    assert configs["decoder_step"].flags == ["FP16"]
    for c in configs.values():
        assert c.pools == {"WORKSPACE": profile.tensorrt.workspace_mb << 20}
        assert c.builder_optimization_level == profile.tensorrt.builder_optimization_level
        assert len(c.profiles) == 1
    prefill = configs["decoder_prefill"].profiles[0].shapes
    lo, opt, hi = prefill["visual_tokens"]
    assert (lo[1], hi[1]) == (16, 400) and opt[1] == 200          # keep_ratio 0.5 of 400
    assert prefill["input_ids"][0] == (1, 1) and prefill["input_ids"][2] == (1, 96)
    past = configs["decoder_step"].profiles[0].shapes["past"]
    assert past[2][4] == 400 + m["num_regions"] + 96
    for role, rel in t["engine_files"].items():
        assert (out / rel).read_bytes().startswith(b"STAND-IN ENGINE")
    assert (out / "trt" / "build.sh").is_file()    # the device can always rebuild


def test_parse_failure_fails_build(export, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_standin(parse_ok=False))
    monkeypatch.setattr(trt_mod, "gpu_info", lambda: ("Orin (stand-in)", "8.7"))
    monkeypatch.setattr(trt_mod, "host_arch", lambda: "aarch64")
    with pytest.raises(ExportError, match="could not parse vision.onnx.*stand-in error"):
        build_bundle(TRT_TARGETS[0], export, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("host,version,gpu,reason", [
    ("x86_64", "10.3.0", ("H100", "9.0"), "build host is x86_64, target is aarch64"),
    ("aarch64", "10.8.1", ("Orin", "8.7"), "TensorRT 10.8.1, target expects 10.3"),
    ("aarch64", "10.3.0", None, "no NVIDIA GPU"),
])
def test_engines_deferred_when_host_differs(export, monkeypatch, tmp_path, host, version, gpu,
                                            reason):
    monkeypatch.setitem(sys.modules, "tensorrt", make_standin(version))
    monkeypatch.setattr(trt_mod, "gpu_info", lambda: gpu)
    monkeypatch.setattr(trt_mod, "host_arch", lambda: host)
    out = build_bundle(TRT_TARGETS[0], export, tmp_path / "b", progress=False)
    t = read_manifest(out)["tensorrt"]
    assert t["engines"] == ENGINES_DEFERRED and reason in t["deferred_reason"]
    assert not list((out / "trt").glob("*.engine"))


def test_check_engine_compat():
    built = {"tensorrt": {"engines": ENGINES_BUILT, "version": "10.3",
                          "built_with": {"gpu": "Orin", "compute_capability": "8.7",
                                         "tensorrt_version": "10.3.0.30"}}}
    check_engine_compat(built, "Orin", "8.7", "10.3.0.26")      # same release, other build
    with pytest.raises(HardwareMismatchError) as e:
        check_engine_compat(built, "NVIDIA RTX 4090", "8.9", "10.3.0")
    assert "Orin" in str(e.value) and "RTX 4090" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(HardwareMismatchError, match="TensorRT 10.4.0"):
        check_engine_compat(built, "Orin", "8.7", "10.4.0")
    deferred = {"tensorrt": {"engines": ENGINES_DEFERRED, "version": "10.3"}}
    check_engine_compat(deferred, "Orin", "8.7", "10.7.0")
    with pytest.raises(HardwareMismatchError, match="checked for TensorRT 10.3"):
        check_engine_compat(deferred, "Orin", "8.7", "8.6.2")


# --- static parser checks (trt_ops) -------------------------------------------------------------

def _model(nodes, inits=(), opset=17, inputs=None, outputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model):
    return {(v["rule"], v["severity"]) for v in check_graph(model, "g")}


def test_trt_ops_flags_unsupported_and_custom_ops():
    m = _model([helper.make_node("Unique", ["x"], ["y"], name="u")])
    assert ("unsupported_op", "blocker") in _rules(m)
    m = _model([helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")])
    assert ("custom_domain", "blocker") in _rules(m)
    assert ("opset", "blocker") in _rules(_model([helper.make_node("Relu", ["x"], ["y"])],
                                                 opset=21))
    assert _rules(_model([helper.make_node("Relu", ["x"], ["y"])])) == set()


def test_trt_ops_topk_k_must_be_constant():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    ok = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"])], [k])
    assert _rules(ok) == set()
    computed = _model([helper.make_node("Shape", ["x"], ["s"]),
                       helper.make_node("TopK", ["x", "s"], ["y", "i"])])
    assert ("constant_input", "blocker") in _rules(computed)


def test_trt_ops_qdq_rules():
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zu = helper.make_tensor("zu", TensorProto.UINT8, [], [128])
    z0 = helper.make_tensor("z0", TensorProto.INT8, [], [0])
    sc = helper.make_tensor("sc", TensorProto.FLOAT, [4], [0.1] * 4)
    zc = helper.make_tensor("zc", TensorProto.INT8, [4], [0] * 4)
    asym = _model([helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["q"]),
                   helper.make_node("DequantizeLinear", ["q", "s", "zu"], ["y"])], [s, zu])
    rules = _rules(asym)
    assert ("qdq_dtype", "blocker") in rules and ("qdq_zero_point", "blocker") in rules
    sym = _model([helper.make_node("QuantizeLinear", ["x", "s", "z0"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z0"], ["y"])], [s, z0])
    assert _rules(sym) == set()
    act_pc = _model([helper.make_node("QuantizeLinear", ["x", "sc", "zc"], ["q"], axis=1),
                     helper.make_node("DequantizeLinear", ["q", "sc", "zc"], ["y"], axis=1)],
                    [sc, zc])
    assert ("qdq_activation_per_channel", "blocker") in _rules(act_pc)
    w = helper.make_tensor("w", TensorProto.INT8, [4, 4, 1, 1], [1] * 16)
    wrong_axis = _model([helper.make_node("DequantizeLinear", ["w", "sc", "zc"], ["wf"], axis=1),
                         helper.make_node("Conv", ["x4", "wf"], ["y"])], [w, sc, zc],
                        inputs=[helper.make_tensor_value_info("x4", TensorProto.FLOAT,
                                                              [1, 4, 2, 2])])
    assert ("qdq_weight_axis", "blocker") in _rules(wrong_axis)


def test_ort_flavoured_int8_graph_is_a_blocker(export, tmp_path, sample_data):
    """The x86 (u8, asymmetric) Q/DQ graph is refused for TensorRT; the build fails loudly."""
    from pcbedge.recipes.configs import StaticInt8Config
    from pcbedge.recipes.quantize import quantize_graph
    from pcbedge.calibration import select_calibration_set
    from pcbedge.families.pcbvlm.recipe import iter_vision_inputs

    cs = select_calibration_set(sample_data)
    quantize_graph(export / "vision.onnx", tmp_path / "v.onnx", StaticInt8Config(),
                   iter_vision_inputs(cs, 128))
    validation = check_graphs({"vision": tmp_path / "v.onnx"}, "10.3")
    assert validation["blockers"] > 0
    with pytest.raises(ExportError, match="TensorRT blocker"):
        raise_on_blockers(validation)


def test_plan_shapes_follow_profile(export):
    m = read_manifest(export)
    profile = load_target(TRT_TARGETS[0])
    from pcbedge.runtime.pruning import TokenPruningConfig
    m = json.loads(json.dumps(m))
    from pcbedge.families import get_family
    ranges = get_family("pcbvlm").trt_axis_ranges(m, profile, TokenPruningConfig("model_prior", 0.25))
    plan = plan_engines(m, profile, ranges)
    assert plan["axis_ranges"]["n_vis"] == [16, 100, 400]
    vision = plan["graphs"]["vision"]["shapes"]["pixel_values"]
    assert vision["min"] == vision["max"] == [1, 3, 640, 640]
    assert np.all(np.array(plan["graphs"]["decoder_step"]["shapes"]["input_ids"]["max"]) == 1)
