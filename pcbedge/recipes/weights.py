"""Quantizers that need no calibration: dynamic INT8 and weight-only 4-bit (ONNX Runtime's
MatMulNBits), and the FP16 recipe, which leaves the graph to the engine builder."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

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
                         per_channel=config.per_channel)
    except Exception as e:  # the quantizer raises many types
        raise ExportError(f"dynamic INT8 quantization of {src.name} failed: "
                          f"{type(e).__name__}: {e}", fix="check the graph's MatMul weights") from e
    return {**config.to_dict(), "nodes": _count(dst, ("MatMulInteger", "DynamicQuantizeLinear"))}


def quantize_int4_weights(src: Path, dst: Path, config, calibration=None) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)   # it logs every node it skips at INFO
    try:
        q = MatMulNBitsQuantizer(str(src), bits=4, block_size=config.block_size,
                                 is_symmetric=config.symmetric)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as e:
        raise ExportError(f"4-bit weight quantization of {src.name} failed: "
                          f"{type(e).__name__}: {e}", fix="check the graph's MatMul weights") from e
    return {**config.to_dict(), "nodes": _count(dst, ("MatMulNBits", "MatMul"))}


def quantize_fp16(src: Path, dst: Path, config, calibration=None) -> dict:
    if Path(src).resolve() != Path(dst).resolve():
        shutil.copyfile(src, dst)
    return {**config.to_dict(), "note": "the graph stays FP32 ONNX; the engine builder runs it "
                                        "in FP16"}
