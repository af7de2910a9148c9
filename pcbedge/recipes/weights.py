"""Quantizers that need no calibration: dynamic INT8 and weight-only 4-bit (ONNX Runtime's
MatMulNBits), and the FP16 recipe, which leaves the graph to the engine builder."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pcbedge.bundle.graph_io import has_external_data, save_graph, side_car
from pcbedge.errors import ExportError


def _count(path: Path, op_types: tuple[str, ...]) -> dict:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in op_types:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def quantize_dynamic_int8(src: Path, dst: Path, config, calibration=None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(config.op_types),
                         per_channel=config.per_channel,
                         use_external_data_format=has_external_data(src))
        if has_external_data(dst):
            import onnx
            save_graph(onnx.load(str(dst)), dst)   # one file again where the int8 weights fit
    except Exception as e:  # the quantizer raises many types
        raise ExportError(f"dynamic INT8 quantization of {src.name} failed: "
                          f"{type(e).__name__}: {e}", fix="check the graph's MatMul weights") from e
    return {**config.to_dict(), "nodes": _count(dst, ("MatMulInteger", "DynamicQuantizeLinear"))}


def quantize_int4_weights(src: Path, dst: Path, config, calibration=None) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)   # it logs every node it skips at INFO
    try:
        from pcbedge.recipes.configs import INT4_COMPUTE
        q = MatMulNBitsQuantizer(str(src), bits=4, block_size=config.block_size,
                                 is_symmetric=config.symmetric,
                                 accuracy_level=INT4_COMPUTE[config.compute])
        q.process()
        q.model.topological_sort()
        save_graph(q.model.model, dst)   # 4-bit weights past 1 GiB keep a side-car file
    except Exception as e:
        raise ExportError(f"4-bit weight quantization of {src.name} failed: "
                          f"{type(e).__name__}: {e}", fix="check the graph's MatMul weights") from e
    return {**config.to_dict(), "nodes": _count(dst, ("MatMulNBits", "MatMul"))}


def quantize_fp16(src: Path, dst: Path, config, calibration=None) -> dict:
    if Path(src).resolve() != Path(dst).resolve():
        shutil.copyfile(src, dst)
        if has_external_data(src):
            shutil.copyfile(side_car(src), side_car(dst))
    return {**config.to_dict(), "note": "the graph stays FP32 ONNX; the engine builder runs it "
                                        "in FP16"}
