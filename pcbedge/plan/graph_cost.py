"""What one run of an ONNX graph costs at given input sizes, read from the graph alone.

The graph is loaded without its external weight data (a 2B-class decoder is read in
milliseconds). Its named dynamic axes are set to the sizes of the call, then shapes are inferred
with the shape arithmetic folded into constants (``Shape`` of a tensor whose shape is known,
and any node whose inputs are all small constants, evaluated with onnx's reference evaluator),
repeated until nothing changes: exporters compute reshape targets from ``Shape`` at run time,
which plain shape inference cannot follow.

Then, per node: multiply-accumulates (MACs) of Conv / MatMul / Gemm and their quantized forms
(ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul, MatMulNBits), by the precision they
compute in; the bytes of the weights the graph reads, of its inputs and outputs (the KV cache
flows there) and of the intermediate tensors; and the largest working set of one node. Ops
whose cost is not counted (fused attention contrib ops, Einsum) are listed, not guessed.
Torch-free: onnx and numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GEMV = ":gemv"         # MACs of a matrix-vector product (M <= GEMV_ROWS) are keyed "<p>:gemv"
GEMV_ROWS = 8
FLOAT_TYPES = (1, 10, 16)   # onnx TensorProto FLOAT, FLOAT16, BFLOAT16
SMALL = 4096            # a constant this small (elements) is folded; weights never are
MAX_ROUNDS = 24
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")
MATMUL_OPS = ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "MatMulNBits",
              "FusedMatMul")
INT8_OPS = ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul")
# Q/DQ pairs are fused into the int8 kernels by onnxruntime's CPU provider and by TensorRT: they
# neither run as nodes nor move their float tensors
FUSED = ("QuantizeLinear", "DequantizeLinear")
UNCOUNTED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "Einsum",
             "ConvTranspose", "LSTM", "GRU", "RNN")


@dataclass
class GraphCost:
    """The cost of one run of one graph at one set of input sizes."""

    macs: dict = field(default_factory=dict)     # precision -> MACs
    weight_bytes: int = 0                        # weight bytes one run reads (rows, for a lookup)
    io_bytes: int = 0                            # graph inputs + outputs
    input_float_values: int = 0                  # float elements of the graph inputs
    activation_bytes: int = 0                    # intermediate tensors (written, then read)
    peak_node_bytes: int = 0                     # largest inputs + outputs of one node
    nodes: int = 0                               # nodes that run (shape arithmetic folded)
    activation_sizes: list = field(default_factory=list)   # bytes of each intermediate
    uncounted: list = field(default_factory=list)   # op types whose MACs are not counted
    unknown_shapes: int = 0                      # compute nodes whose shapes stayed unknown

    def dram_bytes(self, cache_bytes: float) -> float:
        """Bytes one run moves to and from DRAM when the device has ``cache_bytes`` of last-level
        cache: inputs and outputs always; the weights unless they fit in the cache (then they
        stay there from the previous run); each intermediate tensor written and read back only
        when it is larger than half the cache (smaller ones live in it)."""
        if cache_bytes <= 0:
            return float(self.weight_bytes + self.io_bytes + self.activation_bytes)
        weights = self.weight_bytes if self.weight_bytes > cache_bytes else 0
        spill = sum(2 * x for x in self.activation_sizes if x > cache_bytes / 2)
        return float(weights + self.io_bytes + spill)

    def cached_activation_bytes(self, cache_bytes: float) -> float:
        """Bytes of the intermediate tensors that stay in the cache (written, then read)."""
        if cache_bytes <= 0:
            return 0.0
        return float(sum(2 * x for x in self.activation_sizes if x <= cache_bytes / 2))

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def as_dict(self) -> dict:
        return {"macs": dict(self.macs), "total_macs": self.total_macs,
                "weight_bytes": self.weight_bytes, "io_bytes": self.io_bytes,
                "input_float_values": self.input_float_values,
                "activation_bytes": self.activation_bytes,
                "peak_node_bytes": self.peak_node_bytes, "nodes": self.nodes,
                "uncounted_ops": sorted(set(self.uncounted)),
                "unknown_shapes": self.unknown_shapes}


FLOAT = 1          # onnx TensorProto.FLOAT
_FLOAT_SIZE = {"fp32": 4, "fp16": 2}


def _itemsize(elem_type: int, float_size: int = 4) -> int:
    from onnx import helper
    if elem_type == FLOAT:
        return float_size
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _tensor_bytes(t, float_size: int = 4) -> int:
    from onnx import TensorProto
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    return n * _itemsize(t.data_type, float_size)


def _drop_weight_data(model) -> None:
    """Drop the data of every initializer past ``SMALL`` elements that a graph holds inline
    (a built bundle's INT8 / 4-bit weights), keeping type and dims: shape inference copies the
    whole model on each of its rounds, and a 2B bundle's 2.5 GB of inline weights made ``plan``
    take more than 10 minutes. They are marked external, as an export's are, and never read."""
    from onnx import TensorProto
    for t in model.graph.initializer:
        if _is_external(t) or (int(np.prod(t.dims)) if len(t.dims) else 1) <= SMALL:
            continue
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
            t.ClearField(f)
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", "(not read by pcbedge plan)"


def _is_external(t) -> bool:
    return any(e.key == "location" for e in t.external_data)


def _fix_dims(model, dims: dict) -> None:
    """Set every named axis of the graph inputs to ``dims[name]``; KeyError names a missing
    one."""
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    for i in model.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.dim_param:
                value = int(dims[d.dim_param])
                d.ClearField("dim_param")
                d.dim_value = value


def _shapes(model) -> dict:
    out = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = ([d.dim_value if d.HasField("dim_value") else None
                             for d in tt.shape.dim], tt.elem_type)
    for t in model.graph.initializer:
        out[t.name] = (list(t.dims), t.data_type)
    return out


def _known(shape) -> bool:
    return shape is not None and all(isinstance(v, int) and v >= 0 for v in shape)


def _evaluate(node, consts: dict, opsets) -> list | None:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator
    try:
        ins = [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(consts[x].dtype),
                                             consts[x].shape) for x in node.input if x]
        outs = [helper.make_tensor_value_info(o, 0, None) for o in node.output]
        model = helper.make_model(helper.make_graph([node], "fold", ins, outs),
                                  opset_imports=opsets)
        return ReferenceEvaluator(model).run(None, {x: consts[x] for x in node.input if x})
    except Exception:    # an op the reference evaluator lacks: left to run
        return None


def _nbits_shape(node, shapes: dict):
    a = shapes.get(node.input[0], (None, 1))
    return (a[0][:-1] + [int(_attrs(node)["N"])], a[1]) if _known(a[0]) else None


# output shapes of the contrib ops the bundles hold, which onnx's shape inference does not know
CONTRIB_SHAPES = {"MatMulNBits": _nbits_shape}


def _add_contrib_shapes(model, shapes: dict) -> bool:
    from onnx import helper
    added = False
    for n in model.graph.node:
        rule = CONTRIB_SHAPES.get(n.op_type)
        if rule is None or _known(shapes.get(n.output[0], (None,))[0]):
            continue
        got = rule(n, shapes)
        if got is not None:
            model.graph.value_info.append(helper.make_tensor_value_info(n.output[0], got[1],
                                                                        got[0]))
            shapes[n.output[0]] = got
            added = True
    return added


def _fold(model) -> tuple[object, dict]:
    """Shape inference with the shape arithmetic folded; returns (model, shapes)."""
    from onnx import helper, numpy_helper, shape_inference
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if not _is_external(t) and int(np.prod(t.dims)) <= SMALL}
    shapes: dict = {}
    for _ in range(MAX_ROUNDS):
        model = shape_inference.infer_shapes(model, data_prop=True)
        shapes = _shapes(model)
        while _add_contrib_shapes(model, shapes):      # then what follows them
            model = shape_inference.infer_shapes(model, data_prop=True)
            shapes = _shapes(model)
        keep, changed = [], False
        for n in model.graph.node:
            val = None
            if n.op_type == "Shape" and _known(shapes.get(n.input[0], (None,))[0]):
                s = np.array(shapes[n.input[0]][0], dtype=np.int64)
                a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
                val = [s[a.get("start", 0): a.get("end", len(s))]]
            elif n.op_type == "Constant" or (
                    n.input and all(x == "" or x in consts for x in n.input)
                    and not n.op_type.startswith("Random") and n.domain in ("", "ai.onnx")):
                val = _evaluate(n, consts, model.opset_import)
            if val is not None and all(np.size(v) <= SMALL for v in val):
                for name, v in zip(n.output, val):
                    consts[name] = np.asarray(v)
                    model.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
                changed = True
                continue
            keep.append(n)
        del model.graph.node[:]
        model.graph.node.extend(keep)
        del model.graph.value_info[:]
        if not changed:
            model = shape_inference.infer_shapes(model, data_prop=True)
            shapes = _shapes(model)
            while _add_contrib_shapes(model, shapes):
                model = shape_inference.infer_shapes(model, data_prop=True)
                shapes = _shapes(model)
            return model, shapes
    return model, shapes


def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _precision(node, producers: dict, shapes: dict) -> str:
    if node.op_type in INT8_OPS:
        return "int8"
    if node.op_type == "MatMulNBits":
        return "int4"
    # QDQ: a weight (second input) that comes out of DequantizeLinear computes in int8 where the
    # runtime fuses it, which onnxruntime's CPU provider and TensorRT do
    src = producers.get(node.input[1]) if len(node.input) > 1 else None
    if src is not None and src.op_type == "DequantizeLinear":
        return "int8"
    elem = shapes.get(node.output[0], (None, 1))[1]
    return "fp16" if elem in (10, 16) else "fp32"       # FLOAT16, BFLOAT16


def _macs(node, shapes: dict) -> int | None:
    out = shapes.get(node.output[0], (None,))[0]
    if not _known(out):
        return None
    n_out = int(np.prod(out))
    if node.op_type in CONV_OPS:
        w = shapes.get(node.input[3 if node.op_type == "QLinearConv" else 1], (None,))[0]
        return n_out * int(np.prod(w[1:])) if _known(w) else None
    if node.op_type == "MatMulNBits":
        return n_out * int(_attrs(node)["K"])
    a = shapes.get(node.input[0], (None,))[0]
    if not _known(a):
        return None
    if node.op_type == "Gemm":
        return n_out * (a[0] if _attrs(node).get("transA", 0) else a[-1])
    return n_out * a[-1]


def _rows(node, shapes: dict) -> int:
    """M of a MatMul: the rows of the activation, all batch axes folded in."""
    out = shapes.get(node.output[0], (None,))[0]
    return int(np.prod(out[:-1])) if _known(out) and len(out) > 1 else 1 << 30


def _bytes_of(name: str, shapes: dict, float_size: int = 4) -> int:
    shape, elem = shapes.get(name, (None, 1))
    return int(np.prod(shape)) * _itemsize(elem, float_size) \
        if _known(shape) or shape == [] else 0


def graph_cost(path: str | Path, dims: dict, float_precision: str = "fp32",
               fused: bool = False) -> GraphCost:
    """The cost of one run of the graph at ``path`` with its named axes set to ``dims``, on a
    runtime that computes and stores float32 tensors in ``float_precision`` ("fp16": an engine
    builder's fp16 mode lowers the float graph; inputs and outputs keep their declared type).
    ``fused``: an engine that fuses element-wise ops into the GEMM and conv kernels around them
    and attention into one kernel (TensorRT): only the outputs of weight GEMMs and convs are
    intermediate tensors that reach memory; scores, softmax and element-wise results do not."""
    fsize = _FLOAT_SIZE[float_precision]
    model = _load(path)
    weights = {t.name: _tensor_bytes(t, fsize) for t in model.graph.initializer}
    _drop_weight_data(model)
    cost = GraphCost()
    _fix_dims(model, dims)
    model, shapes = _fold(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    cost.weight_bytes = _weights_read(model, weights, shapes, fsize)
    graph_io = {v.name for v in (*model.graph.input, *model.graph.output)}
    cost.io_bytes = sum(_bytes_of(n, shapes) for n in graph_io)
    cost.input_float_values = sum(
        int(np.prod(shapes[v.name][0])) for v in model.graph.input
        if v.name in shapes and _known(shapes[v.name][0])
        and shapes[v.name][1] in FLOAT_TYPES)

    def size(name: str) -> int:          # an intermediate tensor as the engine holds it
        return _bytes_of(name, shapes, fsize)

    cost.nodes = sum(n.op_type not in FUSED for n in model.graph.node)
    for node in model.graph.node:
        if node.op_type in FUSED:
            continue
        if node.op_type in UNCOUNTED:
            cost.uncounted.append(node.op_type)
        elif node.op_type in CONV_OPS + MATMUL_OPS:
            m = _macs(node, shapes)
            if m is None:
                cost.unknown_shapes += 1
            else:
                p = _precision(node, producers, shapes)
                p = float_precision if p == "fp32" else p
                if node.op_type in MATMUL_OPS and _rows(node, shapes) <= GEMV_ROWS:
                    if node.op_type == "MatMulNBits" and \
                            _attrs(node).get("accuracy_level") == 4:
                        # int8 activations: int8 dot products over the 4-bit weights (still
                        # what is read: bytes come from the initializers); the GEMM keeps
                        # the int4 kernel's own rate (measured: at the float path's)
                        p = "int8"
                    p += GEMV      # a matrix-vector product: a kernel of its own on CPUs
                cost.macs[p] = cost.macs.get(p, 0) + m
        if fused and not _weight_compute(node, weights, producers):
            continue
        sizes = [size(o) for o in node.output if o not in graph_io]
        cost.activation_sizes.extend(x for x in sizes if x)
        outs = sum(sizes)
        cost.activation_bytes += 2 * outs
        ins = sum(size(i) for i in node.input if i and i not in weights)
        cost.peak_node_bytes = max(cost.peak_node_bytes, ins + outs)
    return cost


def _weight_compute(node, weights: dict, producers: dict) -> bool:
    """A GEMM or conv with a constant weight (an initializer, or the DequantizeLinear of one)."""
    if node.op_type not in CONV_OPS + MATMUL_OPS:
        return False
    for name in node.input[1:]:
        src = producers.get(name)
        if name in weights or (src is not None and src.op_type == "DequantizeLinear"
                               and src.input[0] in weights):
            return True
    return False


def _weights_read(model, weights: dict, shapes: dict, float_size: int = 4) -> int:
    """Bytes of the weights one run reads: every weight a node consumes, except a table that
    only ``Gather`` looks rows up in (an embedding): there, the rows gathered."""
    read, gathered = set(), 0
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name not in weights:
                continue
            if n.op_type == "Gather" and k == 0:
                gathered += _bytes_of(n.output[0], shapes, float_size) or weights[name]
            else:
                read.add(name)
    return sum(weights[w] for w in read) + gathered


def _load(path):
    """The graph without its external weight data; OSError / ValueError when it cannot be."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise ValueError(f"not an ONNX model ({e})") from None


def weight_bytes_of(path: str | Path, float_precision: str = "fp32") -> int:
    """Bytes of a graph's initializers (its weights), read from the graph without their data;
    float32 ones at ``float_precision``'s size (what the engine holds)."""
    model = _load(path)
    return sum(_tensor_bytes(t, _FLOAT_SIZE[float_precision]) for t in model.graph.initializer)
