"""Quantizers that need no calibration: dynamic INT8 and weight-only 4-bit (ONNX Runtime's
MatMulNBits), and the FP16 recipe, which leaves the graph to the engine builder."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

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
    src, dst = Path(src), Path(dst)
    scratch = dst.parent / f".{dst.stem}.matmul"
    external = has_external_data(src)
    try:
        import onnx
        if "MatMul" in config.op_types:
            # onnxruntime's dynamic quantizer takes MatMul but not Gemm: a tied LM head
            # (Gemm, transB) would stay FP32 and be read whole on every generated token
            src = matmul_copy(src, scratch) or src   # None: no Gemm to rewrite
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(config.op_types),
                         per_channel=config.per_channel,
                         use_external_data_format=external)
        if has_external_data(dst):
            save_graph(onnx.load(str(dst)), dst)   # one file again where the int8 weights fit
    except Exception as e:  # the quantizer raises many types
        raise ExportError(f"dynamic INT8 quantization of {src.name} failed: "
                          f"{type(e).__name__}: {e}", fix="check the graph's MatMul weights") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**config.to_dict(), "nodes": _count(dst, ("MatMulInteger", "DynamicQuantizeLinear",
                                                      "Gemm"))}


def quantize_int4_weights(src: Path, dst: Path, config, calibration=None) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)   # it logs every node it skips at INFO
    try:
        import onnx

        from pcbedge.recipes.configs import INT4_COMPUTE
        model = onnx.load(str(src))
        gemms_as_matmuls(model)   # a tied LM head is exported as Gemm(x, W, transB=1)
        keep = [] if config.head else output_projections(model)
        q = MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size,
                                 is_symmetric=config.symmetric,
                                 accuracy_level=INT4_COMPUTE[config.compute],
                                 nodes_to_exclude=keep)
        q.process()
        q.model.topological_sort()
        save_graph(q.model.model, dst)   # 4-bit weights past 1 GiB keep a side-car file
    except Exception as e:
        raise ExportError(f"4-bit weight quantization of {src.name} failed: "
                          f"{type(e).__name__}: {e}", fix="check the graph's MatMul weights") from e
    return {**config.to_dict(), "nodes": _count(dst, ("MatMulNBits", "MatMul"))}


# ops that pass a projection's result on to a graph output unchanged in value
_PASS_THROUGH = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Add")


def output_projections(model) -> list[str]:
    """Names of the MatMul nodes with a constant weight whose result becomes a graph output
    through value-preserving ops only (a decoder's vocabulary head)."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for out in model.graph.output:
        n = producer.get(out.name)
        while n is not None and n.op_type in _PASS_THROUGH and n.input:
            n = producer.get(n.input[0])
        if n is not None and n.op_type == "MatMul" and len(n.input) > 1 \
                and n.input[1] in inits:
            found.append(n.name)
    return found


def matmul_copy(src: Path, folder: Path) -> Path | None:
    """A copy of the graph ``src`` in ``folder`` with its constant-weight Gemms as MatMuls
    (:func:`gemms_as_matmuls`), or None when it has none. Only those Gemms' weights are read:
    the other weights stay in ``src``'s side-car, copied into ``folder`` file to file (a 2B
    decoder's 6 GB never passes through memory; a hard link would be refused by onnx's
    external-data check), and the rewritten ones go to a side-car of their own."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from pcbedge.bundle.graph_io import SideCarWriter

    model = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    gemm_weights = {n.input[1] for n in model.graph.node
                    if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits}
    if not gemm_weights:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    locations = {e.value for t in model.graph.initializer if uses_external_data(t)
                 for e in t.external_data if e.key == "location"}
    for loc in locations:
        shutil.copyfile(src.parent / loc, folder / loc)
    for name in gemm_weights:                       # only these weights are read
        t = inits[name]
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            t.raw_data = np.fromfile(src.parent / info["location"], dtype=np.uint8,
                                     count=int(info["length"]),
                                     offset=int(info.get("offset", 0))).tobytes()
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    if not gemms_as_matmuls(model):
        return None
    with SideCarWriter(folder / f"{src.name}.matmul.data") as sink:
        for t in model.graph.initializer:
            if not uses_external_data(t) and len(t.raw_data) > 1 << 20:
                sink.put(t, np.frombuffer(t.raw_data, dtype=np.uint8))
    onnx.save(model, str(folder / src.name))
    return folder / src.name


def gemms_as_matmuls(model) -> int:
    """Gemm(A, W) with a constant W (alpha 1, A not transposed, no C or beta 1) becomes
    MatMul(A, W') with W' the weight in [K, N] layout, plus Add(C) where C is given: exact, and
    the form weight-only quantizers take (onnxruntime's MatMulNBits quantizer reads MatMul
    only; the dynamo exporter writes a 2B-class decoder's tied LM head, 151,936 x 1,536, as a
    transB Gemm, which stayed FP32: 0.93 GB read per generated token). Returns how many it
    rewrote."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    done, nodes = 0, []
    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        c = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if (n.op_type != "Gemm" or n.input[1] not in inits or a.get("alpha", 1.0) != 1.0
                or a.get("transA", 0) or (c is not None and a.get("beta", 1.0) != 1.0)):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        kn = np.ascontiguousarray(w.T if a.get("transB", 0) else w)
        name = f"{n.input[1]}_kn" if uses[n.input[1]] > 1 else n.input[1]
        if name == n.input[1]:
            model.graph.initializer.remove(inits[name])
            for v in [v for v in model.graph.value_info if v.name == name]:
                model.graph.value_info.remove(v)   # its [N, K] shape is stale now
        model.graph.initializer.append(numpy_helper.from_array(kn, name))
        out = n.output[0] if c is None else f"{n.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", [n.input[0], name], [out], name=n.name))
        if c is not None:
            nodes.append(helper.make_node("Add", [out, c], [n.output[0]],
                                          name=f"{n.name}_bias"))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def quantize_fp16(src: Path, dst: Path, config, calibration=None) -> dict:
    if Path(src).resolve() != Path(dst).resolve():
        shutil.copyfile(src, dst)
        if has_external_data(src):
            shutil.copyfile(side_car(src), side_car(dst))
    return {**config.to_dict(), "note": "the graph stays FP32 ONNX; the engine builder runs it "
                                        "in FP16"}
