"""Static INT8 quantization of one ONNX graph, in QDQ form, with ONNX Runtime's quantizer.

QDQ (QuantizeLinear/DequantizeLinear pairs around the quantized ops) is the one form both
onnxruntime (which fuses DQ -> op -> Q into integer kernels) and TensorRT's explicit quantization
read, so one graph serves both runtimes. What gets Q/DQ is chosen per graph by measurement
(docs/build.md): quantize where the weights are (Conv, and MatMul/Gemm with a constant B), keep
Softmax and LayerNormalization in float always.

Calibration data is passed in as an iterator of feeds (see :mod:`pcbedge.calibration`); nothing
here loads data behind the caller's back.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterable

from pcbedge.bundle.graph_io import has_external_data, save_graph, side_car
from pcbedge.bundle.outputs import raise_write_failure
from pcbedge.errors import CalibrationError, ExportError, TargetError
from pcbedge.recipes.configs import (ALWAYS_FLOAT, DynamicInt8Config, Fp16Config,
                                     StaticInt8Config, WeightOnlyInt4Config)

log = logging.getLogger(__name__)

def quantize_graph(src: str | Path, dst: str | Path, config,
                   calibration: Iterable[dict] | None = None) -> dict:
    """Quantize the graph ``src`` into ``dst`` as ``config`` says (a recipe config of
    :mod:`pcbedge.recipes.configs`, dispatched by its type), calibrating static schemes on the
    feeds ``calibration`` yields; returns the report of what was quantized."""
    from pcbedge.recipes.weights import quantize_dynamic_int8, quantize_fp16, quantize_int4_weights
    quantizers = {StaticInt8Config: _quantize_qdq_static, DynamicInt8Config: quantize_dynamic_int8,
                  WeightOnlyInt4Config: quantize_int4_weights, Fp16Config: quantize_fp16}
    try:
        quantizer = quantizers[type(config)]
    except KeyError:
        raise TargetError(f"no quantizer for the recipe config {type(config).__name__}",
                          fix=f"use one of: {', '.join(c.__name__ for c in quantizers)}") from None
    if isinstance(config, StaticInt8Config) and calibration is None:
        raise CalibrationError(f"static INT8 quantization of {Path(src).name} got no calibration "
                               "feeds", fix="pass calibration=<an iterable of feed dicts>")
    dst = Path(dst)
    try:
        with temporaries_in(dst.parent):
            return quantizer(Path(src), dst, config, calibration)
    except Exception as e:
        # a full disk or a read-only output is the disk's problem, not the recipe's: the
        # quantizers re-type it (ExportError, "got no input"); the caller's writer maps the
        # OSError to OutputError naming its output
        raise_write_failure(e, within=(dst.parent,))
        raise


@contextlib.contextmanager
def temporaries_in(folder: Path):
    """Run the block with :mod:`tempfile`'s folder inside ``folder`` (the build's staging
    folder): onnxruntime's quantizer makes its temporary folders (``ort.quant.*``,
    ``pre.quant.*``) in the system temp folder, with no option to move them, and a killed build
    leaked them there. Inside the staging folder they go with it: on failure, on SIGTERM, and
    after SIGKILL at the next build's stale-staging cleanup."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=folder) as tmp:
        tempfile.tempdir = tmp
        try:
            yield Path(tmp)
        finally:
            tempfile.tempdir = saved


class FeedReader:
    """An onnxruntime ``CalibrationDataReader`` (it recognises any class with ``get_next``) over
    the feed dicts of ``feeds``; keeps only the graph's inputs and counts what it handed out.
    ``len`` and ``set_range`` let the quantizer calibrate a window of feeds at a time
    (``CalibStridedMinMax``); the feeds are host inputs only, small beside what a graph's
    intermediate tensors take."""

    def __init__(self, feeds: Iterable[dict], input_names: Iterable[str]):
        self._feeds = list(feeds)
        self._names = set(input_names)
        self._pos, self._end = 0, len(self._feeds)
        self.count = 0

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self._feeds))

    def get_next(self) -> dict | None:
        if self._pos >= self._end:
            return None
        feed = self._feeds[self._pos]
        self._pos += 1
        missing = self._names - set(feed)
        if missing:
            raise CalibrationError(f"calibration feed lacks the graph inputs {sorted(missing)}",
                                   fix="yield dicts keyed by the graph's input names")
        self.count += 1
        return {k: v for k, v in feed.items() if k in self._names}

    def __iter__(self):  # onnxruntime >= 1.17 also iterates readers
        return iter(self.get_next, None)


def _quantize_qdq_static(src: Path, dst: Path, config: StaticInt8Config,
                         calibration: Iterable[dict]) -> dict:
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from pcbedge.recipes.report import check_always_float, qdq_report

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.calibration_method]
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = has_external_data(src)   # a graph past 1 GiB of weights (docs/export.md)
    with tempfile.TemporaryDirectory(prefix=".pre-") as tmp:   # in temporaries_in's folder
        model_in = _preprocess(src, Path(tmp) / "pre.onnx") if config.preprocess else src
        model = onnx.load(str(model_in), load_external_data=False)   # names and dims only
        exclude = sorted(set(config.nodes_to_exclude) | set(activation_matmuls(model))
                         | set(narrow_convs(model, config.min_conv_channels)))
        inputs = [i.name for i in model.graph.input
                  if i.name not in {t.name for t in model.graph.initializer}]
        reader = FeedReader(calibration, inputs)
        # min/max merge exactly across feeds: fold each feed's tensors into the ranges at once
        # instead of holding every intermediate tensor of every feed (a 2B vision tower's are
        # ~5 GB a feed). (CalibMaxIntermediateOutputs would drop them unmerged, ORT 1.32.)
        calib = ({"CalibStridedMinMax": 1}
                 if config.calibration_method == "minmax" and len(reader) else {})
        extra = {"ActivationSymmetric": config.activation_symmetric, "WeightSymmetric": True,
                 **calib, **dict(config.extra_options)}
        try:
            quantize_static(str(model_in), str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(config.op_types),
                            per_channel=config.per_channel,
                            reduce_range=config.reduce_range,
                            activation_type=qtype[config.activation_type],
                            weight_type=qtype[config.weight_type],
                            nodes_to_exclude=exclude or None, calibrate_method=method,
                            extra_options=extra, use_external_data_format=big)
        except (CalibrationError, TargetError):
            raise
        except Exception as e:  # the quantizer raises ValueError, RuntimeError, ORT errors
            raise_write_failure(e, within=(dst.parent,))   # a full disk is not "no input"
            if reader.count == 0:
                raise CalibrationError(f"calibration of {src.name} got no input",
                                       fix="pass a calibration set with at least one board"
                                       ) from None
            raise ExportError(f"quantizing {src.name} failed: {type(e).__name__}: {e}",
                              fix="check the op list of the target profile") from e
    if reader.count == 0:
        dst.unlink(missing_ok=True)
        raise CalibrationError(f"calibration of {src.name} got no input",
                               fix="pass a calibration set with at least one board")
    qdq = onnx.load(str(dst))
    moved = shape_reads_skip_qdq(qdq)
    if config.gather_quantized:
        moved += gathers_read_quantized(qdq)
    if moved or has_external_data(dst):
        save_graph(qdq, dst)   # one file again where the int8 weights fit in one
    report = qdq_report(dst)
    check_always_float(report, ALWAYS_FLOAT, dst.name)
    report["calibration_samples"] = reader.count
    report["excluded_nodes"] = exclude
    return report


def _preprocess(src: Path, out: Path) -> Path:
    """onnxruntime's quant_pre_process: shape inference and the portable graph optimisations
    (Conv+BN folding, constant folding) so the quantizer sees the graph the runtime runs."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process
    try:
        # re-saved as one file first: quant_pre_process (onnxruntime 1.32) loses an exporter's
        # side-car .data file whether it is given the path or the loaded model
        single = out.with_name("single.onnx")
        model = onnx.load(str(src))
        reroute_shape_reads(model)
        big = save_graph(model, single)   # past 1 GiB: the weights in single.onnx.data
        del model
        quant_pre_process(str(single), str(out), skip_symbolic_shape=True,
                          save_as_external_data=big, all_tensors_to_one_file=True,
                          external_data_location=side_car(out).name if big else None)
    except Exception as e:  # onnx / ORT raise many types here
        raise_write_failure(e, within=(out.parent,))   # not a reason to skip pre-processing
        raise ExportError(f"quantization pre-processing of {src.name} failed: "
                          f"{type(e).__name__}: {e}",
                          fix="set preprocess=False in the StaticInt8Config") from e
    return out


def reroute_shape_reads(model) -> int:
    """Let Conv+BatchNormalization fold: a Shape node that reads a Conv output which otherwise
    only feeds a BatchNormalization reads the BN's output instead (same shape). The dynamo
    exporter emits such Shape reads, and onnxruntime's Conv+BN fusion refuses a Conv output with
    a second consumer, leaving a float BN behind a quantized conv. Returns how many moved."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    moved = 0
    for bn in model.graph.node:
        src = bn.input[0] if bn.op_type == "BatchNormalization" else None
        if src is None or producer.get(src) is None or producer[src].op_type != "Conv":
            continue
        others = [c for c in consumers.get(src, []) if c is not bn]
        if others and all(c.op_type == "Shape" for c in others):
            for c in others:
                c.input[0] = bn.output[0]
                moved += 1
    return moved


def shape_reads_skip_qdq(model) -> int:
    """A Shape node that reads a DequantizeLinear(QuantizeLinear(x)) output reads the quantized
    tensor instead (not x: a second consumer of a Conv's float output would stop onnxruntime
    fusing Conv+Q into QLinearConv), and DQ nodes left without consumers go. The shape is the
    same, so this is exact; it saves dequantizing a whole tensor only to learn its shape (the
    dynamo exporter reads the input's and the stride-4 features' shapes this way: five
    full-size DequantizeLinear nodes in the reference vision graph). Returns how many moved."""
    producer = {o: n for n in model.graph.node for o in n.output}
    moved = 0
    for n in model.graph.node:
        dq = producer.get(n.input[0]) if n.op_type == "Shape" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            n.input[0] = q.output[0]
            moved += 1
    if moved:
        _drop_dead_qdq(model)
    return moved


# ops that only move or relabel elements: a per-tensor DequantizeLinear commutes with them
MOVE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def gathers_read_quantized(model) -> int:
    """Gather / GatherElements whose data is a per-tensor DequantizeLinear output (possibly
    through element-moving ops that feed nothing else) gather from the quantized tensor, and a
    new DequantizeLinear after the gather converts only what was gathered. A per-tensor
    dequantization commutes with picking elements, so this is exact. The reference vision graph
    gathers 32 region features from the 48 x 160 x 160 stride-4 map: dequantizing the whole map
    first cost ~1.1 ms of a ~17 ms int8 run (docs/build.md). Returns how many gathers moved."""
    from onnx import helper

    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    scalar = {t.name for t in model.graph.initializer if not t.dims or list(t.dims) == [1]}
    moved = 0
    for g in list(model.graph.node):
        if g.op_type not in ("Gather", "GatherElements"):
            continue
        chain, x = [], g.input[0]
        while (producer.get(x) is not None and producer[x].op_type in MOVE_OPS
               and consumers.get(x) == 1):
            chain.append(producer[x])
            x = producer[x].input[0]
        dq = producer.get(x)
        if (dq is None or dq.op_type != "DequantizeLinear"
                or not all(i in scalar for i in dq.input[1:])):
            continue
        (chain[-1] if chain else g).input[0] = dq.input[0]
        retyped = {c.output[0] for c in chain}   # now hold the int8 values: drop their float type
        kept = [v for v in model.graph.value_info if v.name not in retyped]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        gathered = g.output[0] + "_quantized"
        new_dq = helper.make_node("DequantizeLinear", [gathered, *dq.input[1:]], [g.output[0]],
                                  name=g.name + "_dequantize")
        g.output[0] = gathered
        model.graph.node.insert(list(model.graph.node).index(g) + 1, new_dq)
        moved += 1
    if moved:
        _drop_dead_qdq(model)
    return moved


def _drop_dead_qdq(model) -> None:
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)


def activation_matmuls(model) -> list[str]:
    """MatMul nodes whose B is not a weight (attention scores, probabilities @ V). They stay
    float: their inputs are Softmax outputs and K/V activations. (onnxruntime's QDQ quantizer
    ignores its own MatMulConstBOnly option, so they are excluded by name.)"""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}

    def is_weight(name: str, depth: int = 0) -> bool:
        if name in consts:
            return True
        node = producer.get(name)
        return (node is not None and depth < 3 and node.op_type in ("Transpose", "Reshape", "Cast")
                and is_weight(node.input[0], depth + 1))

    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and not is_weight(n.input[1])]


def narrow_convs(model, min_channels: int) -> list[str]:
    """Names of Conv nodes with fewer than ``min_channels`` output channels."""
    if min_channels <= 0:
        return []
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        if shapes[node.input[1]][0] < min_channels:
            out.append(node.name)
    return out


def measure_drift(reference: str | Path, quantized: str | Path, feeds: Iterable[dict],
                  min_score: float = 0.05) -> dict:
    """The check after quantization, on real feeds: per float output of ``quantized`` its
    relative L2 error against ``reference`` (mean and max over the feeds; for the region outputs
    this is order-sensitive, since int8 may swap near-equal TopK proposals), and when the graph
    has ``region_boxes``/``region_scores`` the detection-level view of :func:`match_detections`
    under the key ``"detections"``."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(reference), opts, providers=["CPUExecutionProvider"])
    qnt = ort.InferenceSession(str(quantized), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    errs: dict[str, list[float]] = {n: [] for n in names}
    det = {"kept": 0, "total": 0, "score": [], "box": []}
    for feed in feeds:
        r = dict(zip(names, ref.run(names, feed)))
        q = dict(zip(names, qnt.run(names, feed)))
        for n in names:
            if np.issubdtype(r[n].dtype, np.floating):
                errs[n].append(float(np.linalg.norm(q[n] - r[n])
                                     / max(float(np.linalg.norm(r[n])), 1e-12)))
        if "region_boxes" in r and "region_scores" in r:
            kept, ds, db, total = match_detections(r, q, min_score)
            det["kept"] += kept
            det["total"] += total
            det["score"] += ds
            det["box"] += db
    out = {n: {"mean": float(np.mean(v)), "max": float(np.max(v)), "inputs": len(v)}
           for n, v in errs.items() if v}
    if det["total"]:
        out["detections"] = {
            "min_score": min_score, "fp32_detections": det["total"],
            "kept": det["kept"] / det["total"],
            "score_abs_err": float(np.mean(det["score"])) if det["score"] else None,
            "box_abs_err_px": float(np.mean(det["box"])) if det["box"] else None}
    return out


def match_detections(ref: dict, out: dict, min_score: float):
    """(kept, score diffs, box diffs, total) for the reference proposals scored >= ``min_score``
    (batch item 0): each is matched to the other graph's proposal of highest IoU (int8 may
    reorder TopK); kept when that IoU >= 0.5 and its score >= ``min_score``."""
    import numpy as np

    from pcbedge.geometry import iou_matrix
    rs, rb = ref["region_scores"][0], ref["region_boxes"][0]
    qs, qb = out["region_scores"][0], out["region_boxes"][0]
    live = np.flatnonzero(rs >= min_score)
    if not live.size:
        return 0, [], [], 0
    ious = iou_matrix(rb[live], qb)
    best = ious.argmax(1)
    ok = (ious[np.arange(live.size), best] >= 0.5) & (qs[best] >= min_score)
    ds = [float(x) for x in np.abs(qs[best] - rs[live])[ok]]
    db = [float(x) for x in np.abs(qb[best] - rb[live])[ok].mean(1)]
    return int(ok.sum()), ds, db, int(live.size)
