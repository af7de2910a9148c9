"""Where the Q/DQ nodes of a quantized graph sit: the check after quantization.

For every compute node the report says whether its inputs come out of a DequantizeLinear (it
runs on int8 data once the runtime fuses DQ -> op -> Q) or stayed float, with counts per op
type and how the scales are laid out (per-tensor / per-channel, zero points). The report goes
into the bundle manifest's ``quantization`` block; :mod:`pcbedge.recipes.trt_ops` reads the same
facts to check what TensorRT accepts.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pcbedge.errors import ExportError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Nodes that do arithmetic on activations; shape plumbing (Shape, Reshape, Unsqueeze, Concat of
# shapes, Cast, Constant ...) is left out of the float list so it stays readable.
COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Softmax", "LayerNormalization", "Add", "Sub",
    "Mul", "Div", "Relu", "Clip", "Sigmoid", "Tanh", "Erf", "Exp", "Sin", "Cos", "Pow", "Sqrt",
    "Resize", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMax", "ReduceMean",
    "ReduceSum", "TopK", "GatherElements", "BatchNormalization", "Gelu", "Where",
})


def load_model(model):
    import onnx
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def constant_values(model) -> dict:
    """{tensor name: numpy array} of the initializers and Constant node outputs."""
    from onnx import numpy_helper
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def describe_qdq(model) -> list[dict]:
    """One entry per Q/DQ node: which tensor, weight or activation, dtype, granularity, axis,
    whether scale and zero point are constants and the zero point's values are all zero."""
    consts = constant_values(model)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type not in QDQ_OPS:
            continue
        scale = consts.get(n.input[1]) if len(n.input) > 1 else None
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        per_channel = scale is not None and scale.size > 1
        out.append({
            "name": n.name, "op_type": n.op_type, "tensor": n.input[0], "output": n.output[0],
            "weight": n.input[0] in consts,
            "dtype": str(zp.dtype) if zp is not None else "uint8",
            "per_channel": per_channel, "axis": axis if per_channel else None,
            "scale_constant": scale is not None,
            "zero_point_constant": zp is not None or len(n.input) < 3 or not n.input[2],
            "zero_point_zero": zp is None or not bool(zp.any()),
            "feeds": sorted({c.op_type for c in consumers.get(n.output[0], [])}),
        })
    return out


def qdq_report(model) -> dict:
    """The placement report of a QDQ graph (a path or an onnx.ModelProto).

    A weighted op (Conv, MatMul, Gemm) counts as int8 when its weight (input 1) comes out of a
    DequantizeLinear: onnxruntime and TensorRT run it as an integer GEMM. Any other node counts
    as int8 when a DequantizeLinear feeds it and its output goes into a QuantizeLinear (a
    DQ -> op -> Q unit the runtime fuses). Every other compute node runs in float, including
    one fed by a DQ without a Q after it.
    """
    model = load_model(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    q_fed = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    quantized, floating = [], []
    for n in model.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        dq_in = [i for i, t in enumerate(n.input) if t in producer
                 and producer[t].op_type == "DequantizeLinear"]
        q_out = bool(q_fed.intersection(n.output))
        weighted = n.op_type in WEIGHTED_OPS and 1 in dq_in
        if (dq_in and q_out and n.op_type not in WEIGHTED_OPS) or weighted:
            quantized.append({"name": n.name, "op_type": n.op_type, "dq_inputs": dq_in,
                              "q_output": q_out})
        elif n.op_type in COMPUTE_OPS or q_out:
            floating.append({"name": n.name, "op_type": n.op_type, "dq_inputs": dq_in,
                             "q_output": q_out})
    qdq = describe_qdq(model)
    weights = [d for d in qdq if d["op_type"] == "DequantizeLinear" and d["weight"]]
    acts = [d for d in qdq if d["op_type"] == "QuantizeLinear"]
    return {
        "qdq_nodes": dict(Counter(d["op_type"] for d in qdq)),
        "quantized_by_op_type": dict(sorted(Counter(q["op_type"] for q in quantized).items())),
        "float_by_op_type": dict(sorted(Counter(f["op_type"] for f in floating).items())),
        "quantized_nodes": quantized,
        "float_nodes": floating,
        "weights": {"per_channel": sum(d["per_channel"] for d in weights),
                    "per_tensor": sum(not d["per_channel"] for d in weights),
                    "dtypes": sorted({d["dtype"] for d in weights})},
        "activations": {"dtypes": sorted({d["dtype"] for d in acts}),
                        "symmetric": all(d["zero_point_zero"] for d in acts),
                        "per_tensor": all(not d["per_channel"] for d in acts)},
    }


def check_always_float(report: dict, op_types, graph_name: str,
                       float_outputs=("Softmax",)) -> None:
    """ExportError if an op of ``op_types`` computes on dequantized (int8) inputs, or an op of
    ``float_outputs`` has its output quantized (int8 attention probabilities over hundreds of
    tokens lose the small weights). A LayerNorm output quantized as the next GEMM's input is
    fine: the normalisation itself ran in float."""
    nodes = (*report["quantized_nodes"], *report["float_nodes"])
    bad = sorted({q["name"] or q["op_type"] for q in nodes
                  if (q["op_type"] in op_types and q["dq_inputs"])
                  or (q["op_type"] in float_outputs and q["q_output"])})
    if bad:
        raise ExportError(f"{graph_name}: {bad} ended up computing on int8 data, but "
                          f"{', '.join(op_types)} must stay float",
                          fix="remove the producing op types from the quantization op list")


def summarize(report: dict) -> str:
    """One line for logs: ``Conv 17 int8, 3 float; Softmax 0 int8``."""
    q, f = report["quantized_by_op_type"], report["float_by_op_type"]
    parts = [f"{op} {q.get(op, 0)} int8/{f.get(op, 0)} float"
             for op in sorted(set(q) | ({"Conv", "MatMul", "Gemm", "Softmax"} & set(f)))]
    return "; ".join(parts) or "no quantized nodes"


def save_report(report: dict, path: str | Path) -> None:
    import json
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
