"""Static, host-side check that TensorRT 10's ONNX parser can take a graph.

No TensorRT needed: the op set, opset range and restrictions below are written down from
onnx-tensorrt's ``docs/operators.md`` (https://github.com/onnx/onnx-tensorrt, docs/operators.md
of the 10.x releases: "TensorRT 10.0 supports operators in the inclusive range of opset 9 to
opset 20"; the per-op rows and restrictions as in its support matrix). It catches the
mistakes that otherwise surface only when the engine is built on the device: an unsupported op,
a custom-domain op, Q/DQ layouts TensorRT's explicit quantization refuses, a TopK whose K is
computed. A violation is a ``blocker`` (the parser or builder will fail) or a
``warning`` (it will build, check the result). It does not replace building the engine on the
device; ``polygraphy inspect capability`` there is the authoritative answer.
"""
from __future__ import annotations

from pathlib import Path

from pcbedge.errors import ExportError, TargetError

# Opset range of the default ONNX domain, per TensorRT major version (operators.md headline).
OPSET_RANGE: dict[str, tuple[int, int]] = {"10": (9, 20)}

# Ops marked "Y" in onnx-tensorrt docs/operators.md: the full 8.5 table, which 10.x keeps, plus
# the rows later releases turned to "Y" that a VLM export emits (LayerNormalization,
# GroupNormalization, IsInf, Gelu). Attention only arrived in 10.14, so it is not here. Written
# from the 8.5 table and the 10.x headline without the full 10.3 table at hand: an op missing
# here that 10.3 does parse shows up as a false blocker, to be added with its source.
TRT10_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand",
    "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "If",
    "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool",
    "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus",
    "Pow", "QuantizeLinear", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink",
    "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
    "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})
# Inputs that operators.md requires to be initializers (TensorRT 10.3; Squeeze/Unsqueeze only
# accept computed axes from 10.7 on).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "TopK": (1,), "Conv": (1,), "ConvTranspose": (1,), "CumSum": (1,), "Slice": (3,),
    "Squeeze": (1,), "Unsqueeze": (1,),
}
RESIZE_MODES = {"nearest", "linear", "cubic"}
RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
# Per-channel weight scales: the axis TensorRT's explicit quantization accepts, by consumer
# (the output-channel axis of the weight).
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
INT32_MAX = 2**31 - 1


def _violation(graph, node, rule, severity, message) -> dict:
    return {"graph": graph, "node": node.name if node is not None else "",
            "op_type": node.op_type if node is not None else "", "rule": rule,
            "severity": severity, "message": message}


def check_graph(model, graph: str = "", trt_version: str = "10.3") -> list[dict]:
    """Every way ``model`` (a path or ModelProto) breaks TensorRT ``trt_version``'s parser."""
    from pcbedge.recipes.report import constant_values, describe_qdq, load_model

    major = trt_version.split(".")[0]
    if major not in OPSET_RANGE:
        raise TargetError(f"tensorrt version {trt_version!r}: no parser rules for TensorRT "
                          f"{major}.x", fix=f"use a {', '.join(OPSET_RANGE)}.x version, or add "
                                            "its rules to pcbedge/recipes/trt_ops.py")
    model = load_model(model)
    out = _check_opset(model, graph, OPSET_RANGE[major])
    consts = constant_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        out += _check_node(node, graph, consts, producer)
    out += _check_qdq(model, graph, describe_qdq(model))
    out += _check_int64(model, graph, consts)
    return out


def _check_opset(model, graph, rng) -> list[dict]:
    out = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not rng[0] <= imp.version <= rng[1]:
            out.append(_violation(graph, None, "opset", "blocker",
                                  f"opset {imp.version} is outside TensorRT's range "
                                  f"{rng[0]}..{rng[1]}; re-export at opset {min(rng[1], 18)}"))
    return out


def _check_node(node, graph, consts, producer) -> list[dict]:
    out = []
    if node.domain not in ("", "ai.onnx"):
        return [_violation(graph, node, "custom_domain", "blocker",
                           f"{node.domain}::{node.op_type} is not an ONNX op TensorRT parses "
                           "(an onnxruntime-optimised graph?); ship the portable graph")]
    if node.op_type not in TRT10_OPS:
        out.append(_violation(graph, node, "unsupported_op", "blocker",
                              f"{node.op_type} is not supported by TensorRT 10's ONNX parser"))
    for idx in CONSTANT_INPUTS.get(node.op_type, ()):
        if idx < len(node.input) and node.input[idx] and not _is_constant(node.input[idx],
                                                                         consts, producer):
            out.append(_violation(graph, node, "constant_input", "blocker",
                                  f"{node.op_type} input {idx} ({node.input[idx]}) must be an "
                                  "initializer for TensorRT; fold constants before export"))
    if node.op_type == "Resize":
        attrs = {a.name: a.s.decode() for a in node.attribute if a.s}
        for key, valid in (("mode", RESIZE_MODES), ("coordinate_transformation_mode",
                                                     RESIZE_COORD), ("nearest_mode",
                                                                     RESIZE_NEAREST)):
            if key in attrs and attrs[key] not in valid:
                out.append(_violation(graph, node, "resize_mode", "blocker",
                                      f"Resize {key}={attrs[key]!r} is not supported"))
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        out.append(_violation(graph, node, "maxpool_indices", "blocker",
                              "MaxPool's Indices output is not supported"))
    return out


def _is_constant(name, consts, producer, depth: int = 0) -> bool:
    """An initializer / Constant output (what the parser reads), or a value TensorRT folds:
    DequantizeLinear / Identity / Cast / Reshape of constants."""
    if name in consts:
        return True
    node = producer.get(name)
    if node is None or depth > 4 or node.op_type not in (
            "DequantizeLinear", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"):
        return False
    return all(not i or _is_constant(i, consts, producer, depth + 1) for i in node.input)


def _check_qdq(model, graph, qdq: list[dict]) -> list[dict]:
    nodes = {n.output[0]: n for n in model.graph.node if n.op_type in ("QuantizeLinear",
                                                                       "DequantizeLinear")}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for d in qdq:
        node = nodes.get(d["output"])
        if d["dtype"] != "int8":
            out.append(_violation(graph, node, "qdq_dtype", "blocker",
                                  f"{d['op_type']} of {d['tensor']} is {d['dtype']}; TensorRT's "
                                  "explicit quantization takes int8 (build with symmetric int8 "
                                  "activations for TensorRT targets)"))
        if not d["scale_constant"] or not d["zero_point_constant"]:
            out.append(_violation(graph, node, "qdq_constant", "blocker",
                                  f"{d['op_type']} of {d['tensor']}: scale and zero point must "
                                  "be constants"))
        if not d["zero_point_zero"]:
            out.append(_violation(graph, node, "qdq_zero_point", "blocker",
                                  f"{d['op_type']} of {d['tensor']}: zero point must be 0 "
                                  "(symmetric int8)"))
        if d["per_channel"] and not d["weight"]:
            out.append(_violation(graph, node, "qdq_activation_per_channel", "blocker",
                                  f"{d['tensor']}: activations must be quantized per tensor"))
        if d["per_channel"] and d["weight"] and node is not None:
            for c in consumers.get(node.output[0], []):
                want = WEIGHT_AXIS.get(c.op_type)
                if c.op_type == "Gemm" and any(a.name == "transB" and a.i for a in c.attribute):
                    want = 0
                if want is not None and d["axis"] != want:
                    out.append(_violation(graph, node, "qdq_weight_axis", "blocker",
                                          f"{d['tensor']}: per-channel axis {d['axis']} for a "
                                          f"{c.op_type} weight; TensorRT needs axis {want}"))
    return out


def _check_int64(model, graph, consts) -> list[dict]:
    """INT64 is cast down to INT32 by the parser where a layer lacks INT64 (8.x always,
    10.x for most layers); a constant that does not fit would be clamped."""
    import numpy as np
    slice_inputs = {i for n in model.graph.node if n.op_type == "Slice" for i in n.input[1:3]}
    out = []
    for name, v in consts.items():
        if v.dtype == np.int64 and v.size and name not in slice_inputs and (
                v.max() > INT32_MAX or v.min() < -INT32_MAX - 1):
            out.append(_violation(graph, None, "int64_range", "warning",
                                  f"INT64 constant {name} holds values outside INT32; TensorRT "
                                  "casts INT64 to INT32 and clamps them"))
    return out


def check_graphs(graphs: dict[str, Path], trt_version: str) -> dict:
    """Check several graphs; the manifest's ``tensorrt_validation`` block."""
    violations = []
    ops: dict[str, list[str]] = {}
    for role, path in graphs.items():
        from pcbedge.recipes.report import load_model
        model = load_model(path)
        ops[role] = sorted({n.op_type for n in model.graph.node})
        violations += check_graph(model, role, trt_version)
    blockers = [v for v in violations if v["severity"] == "blocker"]
    return {"tensorrt_version": trt_version, "source": "onnx-tensorrt docs/operators.md (10.x)",
            "op_types": ops, "blockers": len(blockers),
            "warnings": len(violations) - len(blockers), "violations": violations}


def raise_on_blockers(validation: dict) -> None:
    """ExportError naming the first blockers, if any."""
    blockers = [v for v in validation["violations"] if v["severity"] == "blocker"]
    if blockers:
        shown = "; ".join(f"{v['graph']}:{v['node'] or '-'} {v['message']}" for v in blockers[:5])
        more = f" (and {len(blockers) - 5} more)" if len(blockers) > 5 else ""
        raise ExportError(f"{len(blockers)} TensorRT blocker(s): {shown}{more}",
                          fix="change the export or the quantization recipe so the graphs use "
                              "what TensorRT 10 parses (docs/build.md, TensorRT path)")
