"""INT8 kernel arithmetic: 7-bit weights (reduce_range) and the warning for bundles whose 8-bit
u8 x s8 sums clip on x86 CPUs without VNNI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pcbedge.calibration import select_calibration_set
from pcbedge.families.pcbvlm.recipe import iter_vision_inputs
from pcbedge.recipes.configs import StaticInt8Config, config_for_group
from pcbedge.recipes.quantize import quantize_graph
from pcbedge.runtime.int8_kernels import saturating_graphs, saturation_warning, x86_has_vnni
from pcbedge.targets import load_target
from pcbedge.testing import tiny_bundle


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 {flags}\n\n")
    return p


def test_vnni_read_from_cpu_flags(tmp_path):
    assert x86_has_vnni(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni")) is True
    assert x86_has_vnni(_cpuinfo(tmp_path, "avx2 avx_vnni")) is True
    assert x86_has_vnni(_cpuinfo(tmp_path, "avx2 avx512f avx512bw")) is False
    assert x86_has_vnni(tmp_path / "absent") is None


def _manifest(reduce_range: bool, weight_type="int8", engine="onnxruntime") -> dict:
    cfg = {"scheme": "qdq_static", "activation_type": "uint8", "weight_type": weight_type,
           "reduce_range": reduce_range}
    return {"runtime": {"engine": engine},
            "quantization": {"graphs": {"vision": {"config": cfg},
                                        "decoder_step": {"config": {"scheme": "int8_dynamic"}}}}}


def test_only_full_range_u8s8_static_graphs_clip():
    assert saturating_graphs(_manifest(False)) == ["vision"]
    assert saturating_graphs(_manifest(True)) == []
    assert saturating_graphs(_manifest(False, weight_type="uint8")) == []
    assert saturating_graphs({}) == []


def test_warning_only_on_x86_without_vnni(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = _cpuinfo(tmp_path / "a", "avx2 avx512f")
    vnni = _cpuinfo(tmp_path / "b", "avx2 avx512_vnni")
    msg = saturation_warning(_manifest(False), "x86_64", plain)
    assert msg and "['vision']" in msg and "reduce_range = true" in msg
    assert saturation_warning(_manifest(False), "amd64", plain)
    assert saturation_warning(_manifest(False), "x86_64", vnni) is None
    assert saturation_warning(_manifest(False), "aarch64", plain) is None
    assert saturation_warning(_manifest(True), "x86_64", plain) is None
    assert saturation_warning(_manifest(False, engine="tensorrt"), "x86_64", plain) is None
    assert saturation_warning(_manifest(False), "x86_64", tmp_path / "absent") is None


@pytest.mark.parametrize("target", ["x86-cpu", "arm64-cpu"])
def test_cpu_targets_build_kernels_that_cannot_clip(target):
    cfg = config_for_group(load_target(target), "vision")
    assert isinstance(cfg, StaticInt8Config)
    assert (cfg.activation_type, cfg.weight_type) == ("uint8", "uint8")
    m = {"quantization": {"graphs": {"vision": {"config": cfg.to_dict()}}}}
    assert saturating_graphs(m) == []


def _conv_weight_range(path: Path) -> int:
    g = onnx.load(str(path)).graph
    inits = {t.name: t for t in g.initializer}
    widest = 0
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w = numpy_helper.to_array(inits[n.input[0]])
            if w.dtype == np.int8 and w.ndim == 4:       # conv weights (OIHW)
                widest = max(widest, int(np.abs(w.astype(np.int32)).max()))
    return widest


def test_reduce_range_keeps_weights_within_7_bits(tmp_path, tmp_path_factory, sample_data):
    export = tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]
    cal = select_calibration_set(sample_data)
    full, reduced = tmp_path / "full.onnx", tmp_path / "reduced.onnx"
    quantize_graph(export / "vision.onnx", full, StaticInt8Config(op_types=("Conv",)),
                   iter_vision_inputs(cal, 128))
    rep = quantize_graph(export / "vision.onnx", reduced,
                         StaticInt8Config(op_types=("Conv",), reduce_range=True),
                         iter_vision_inputs(cal, 128))
    assert rep["quantized_by_op_type"]["Conv"] >= 10
    assert _conv_weight_range(full) == 127          # symmetric per-channel: the max hits 127
    assert _conv_weight_range(reduced) <= 64        # 2 x 255 x 64 = 32,640 fits an int16
