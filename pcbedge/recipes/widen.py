"""Widening an fp16 export's graph to float32 before the build quantizes or keeps it float.

onnxruntime's quantizers and its CPU kernels work from float32 graphs. An fp16 export
(``pcbedge export --precision fp16``) keeps its inputs and outputs in float32 and computes inside
in fp16; widening turns every fp16 tensor of the graph into float32 -- initializers, constants,
node attributes, ``Cast`` targets and declared value types, subgraphs included -- so the graph
computes in float32 from the fp16-rounded weights. Nothing else changes.

Weights are streamed: a graph whose weights live in a side-car file is read and written one
initializer at a time, so a 2B decoder never sits in memory whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pcbedge.bundle.graph_io import SideCarWriter, side_car
from pcbedge.errors import BundleError

FLOAT, FLOAT16 = 1, 10   # onnx TensorProto element types


def widen_graph(src: Path, dst: Path) -> dict:
    """Write ``src`` (a graph of an fp16 export) widened to float32 at ``dst`` (and its
    side-car when ``src`` has one); returns counts of what changed."""
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    counts = {"initializers": 0, "attributes": 0, "casts": 0, "value_types": 0,
              "bytes_in": 0, "bytes_out": 0}
    out = side_car(dst)
    out.unlink(missing_ok=True)
    with SideCarWriter(out) as sink:
        for t in model.graph.initializer:
            _widen_tensor(t, src.parent, sink, counts)
        _widen_graph(model.graph, counts)
    if not sink.used:
        out.unlink(missing_ok=True)
    onnx.save(model, str(dst))
    return counts


def _widen_graph(graph, counts: dict) -> None:
    import onnx

    for v in (*graph.input, *graph.output, *graph.value_info):
        tt = v.type.tensor_type
        if tt.elem_type == FLOAT16:
            tt.elem_type = FLOAT
            counts["value_types"] += 1
    for t in graph.sparse_initializer:   # not written by the exporters; refuse rather than miss
        raise BundleError(f"the fp16 graph holds a sparse initializer {t.values.name!r}, which "
                          "pcbedge does not widen", fix="export with --precision fp32")
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT16:
                a.i = FLOAT
                counts["casts"] += 1
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT16:
                _widen_inline(a.t)
                counts["attributes"] += 1
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    if t.data_type == FLOAT16:
                        _widen_inline(t)
                        counts["attributes"] += 1
            elif a.type == onnx.AttributeProto.GRAPH:
                _widen_graph(a.g, counts)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _widen_graph(g, counts)


def _widen_inline(t) -> None:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t).astype(np.float32)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _widen_tensor(t, base: Path, sink: SideCarWriter, counts: dict) -> None:
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(t):
        if t.data_type == FLOAT16:
            _widen_inline(t)
            counts["initializers"] += 1
        return
    info = {e.key: e.value for e in t.external_data}
    offset, length = int(info.get("offset", 0)), int(info["length"])
    raw = np.fromfile(base / info["location"], dtype=np.uint8, count=length, offset=offset)
    counts["bytes_in"] += length
    if t.data_type == FLOAT16:
        raw = raw.view(np.float16).astype("<f4").view(np.uint8)
        t.data_type = FLOAT
        counts["initializers"] += 1
    sink.put(t, raw)
    counts["bytes_out"] += raw.size


WIDE_DIR = ".fp32"   # widened graphs set aside while their quantized form is written


def widen_export(stage: Path, export_dir: Path, manifest: dict, say) -> set[str]:
    """Every graph of the fp16 export in ``export_dir`` written widened to float32 in place in
    ``stage`` (the stage's links to the fp16 files are removed first, never written through);
    returns the roles widened."""
    for role, g in manifest["graphs"].items():
        dst = stage / g["file"]
        for staged in (dst, side_car(dst)):
            staged.unlink(missing_ok=True)
        counts = widen_graph(export_dir / g["file"], dst)
        say(f"widened {g['file']} from fp16 to float32 ({counts['initializers']} weights, "
            f"{counts['casts']} casts)")
    return set(manifest["graphs"])


def set_aside(stage: Path, rel: str) -> Path:
    """Move the stage's widened graph ``rel`` (and its side-car) under ``stage/.fp32``, to be
    quantized from there into its place; returns its new path."""
    src, dst = stage / rel, stage / WIDE_DIR / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.replace(dst)
    if side_car(src).exists():
        side_car(src).replace(side_car(dst))
    return dst


def settle(stage: Path) -> None:
    """The set-aside widened graphs go once everything is quantized."""
    import shutil

    shutil.rmtree(stage / WIDE_DIR, ignore_errors=True)
