"""Quantize a Qwen-VL export (``runner: qwen2-vl``) into a new bundle, atomically.

``quantize_qwen_bundle(export_dir, out_dir, QwenQuantConfig(...), calibration=images)``: the
vision graph INT8 (static QDQ via :func:`pcbedge.build.quantize.quantize_graph`) and/or the
decoder INT8 (dynamic or static QDQ) or weight-only 4-bit (``MatMulNBitsQuantizer``). The
calibration images (uint8 RGB arrays) are passed in as an iterable, never loaded here; the
decoder's static calibration feeds are made from them with the FP32 bundle. The new manifest
records the precision and the schemes; every file is hashed again.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pcbedge.errors import BundleError, CalibrationError, TargetError

log = logging.getLogger(__name__)

CALIBRATION_QUESTION = "where are the defects on this board?"
VISION_SCHEMES = ("fp32", "int8_static")
DECODER_SCHEMES = ("fp32", "int8_dynamic", "int8_static", "int4_weight")
PRECISION = {"fp32": "fp32", "int8_static": "int8", "int8_dynamic": "int8",
             "int4_weight": "int4-weight"}


@dataclass(frozen=True)
class QwenQuantConfig:
    """How each graph of a Qwen-VL bundle is quantized (``embed`` stays FP32: a Gather)."""

    vision: str = "int8_static"
    decoder: str = "int4_weight"
    block_size: int = 32            # int4_weight: weights per scale
    decoder_steps: int = 4          # int8_static: cached steps per image in the calibration

    def __post_init__(self):
        for name, value, valid in (("vision", self.vision, VISION_SCHEMES),
                                   ("decoder", self.decoder, DECODER_SCHEMES)):
            if value not in valid:
                raise TargetError(f"Qwen-VL {name} quantization {value!r} is not valid",
                                  fix=f"use one of: {', '.join(valid)}")
        if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                or self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise TargetError(f"block_size {self.block_size!r} is not a power of two >= 16",
                              fix="use 32 (or 64, 128)")


def _static_config():
    from pcbedge.build.quantize import QuantizationConfig
    # weights of the linear layers; activation MatMuls, Softmax and norms stay float
    return QuantizationConfig(op_types=("MatMul", "Gemm"), per_channel=True)


def _vision_int8_static(src: Path, dst: Path, runner, images: list, cfg) -> dict:
    from pcbedge.build.quantize import quantize_graph
    feeds = []
    for img in images:
        prompt = runner.build_prompt(img, CALIBRATION_QUESTION)
        feeds.append(runner.vision_feeds(prompt))
    return quantize_graph(src, dst, _static_config(), feeds)


def _decoder_int8_dynamic(src: Path, dst: Path, runner, images: list, cfg) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], per_channel=True)
    return {"scheme": "int8_dynamic", "op_types": ["MatMul"]}


def _decoder_int8_static(src: Path, dst: Path, runner, images: list, cfg) -> dict:
    from pcbedge.build.quantize import quantize_graph
    return quantize_graph(src, dst, _static_config(),
                          decoder_feeds(runner, images, cfg.decoder_steps))


def _decoder_int4_weight(src: Path, dst: Path, runner, images: list, cfg) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)   # it logs every node it skips at INFO
    q = MatMulNBitsQuantizer(str(src), bits=4, block_size=cfg.block_size, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return {"scheme": "int4_weight", "block_size": cfg.block_size, "symmetric": True}


QUANTIZERS: dict[tuple[str, str], Callable] = {
    ("vision", "int8_static"): _vision_int8_static,
    ("decoder", "int8_dynamic"): _decoder_int8_dynamic,
    ("decoder", "int8_static"): _decoder_int8_static,
    ("decoder", "int4_weight"): _decoder_int4_weight,
}


def decoder_feeds(runner, images: Iterable, steps: int = 4) -> list[dict]:
    """Prefill feeds and ``steps - 1`` cached greedy step feeds per image (FP32 bundle)."""
    feeds = []
    dec, emb = runner.sessions["decoder"], runner.sessions["embed"]
    for img in images:
        prompt = runner.encode_images(runner.build_prompt(img, CALIBRATION_QUESTION))
        embeds, pos, nxt, _ = runner.prefill_inputs(prompt, runner.pruning)
        f = {"inputs_embeds": embeds, "position_ids": pos,
             "past": np.zeros(runner.kv_shape, np.float32)}
        for i in range(steps):
            feeds.append(f)
            logits, present = dec.run(None, f)
            tok = np.array([[int(logits[0].argmax())]], np.int64)
            f = {"inputs_embeds": emb.run(None, {"input_ids": tok})[0],
                 "position_ids": np.full((3, 1, 1), nxt + i, np.int64), "past": present}
    return feeds


def quantize_qwen_bundle(export_dir: str | Path, out_dir: str | Path, config: QwenQuantConfig,
                         calibration: Iterable | None = None, *,
                         overwrite: bool = False) -> Path:
    """Write the quantized bundle ``out_dir`` from the FP32 Qwen-VL export ``export_dir``.
    ``calibration`` yields uint8 RGB images [H, W, 3]; the static schemes need at least one."""
    from pcbedge.export.atomic import staged_dir
    from pcbedge.export.manifest import list_files, read_manifest, verify_files, write_manifest
    from pcbedge.runtimes.qwen_runner import QwenRunner

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    verify_files(export_dir, manifest)
    if manifest.get("runner") != "qwen2-vl":
        raise BundleError(f"{export_dir} is not a Qwen-VL export (runner "
                          f"{manifest.get('runner', 'onnx')!r})",
                          fix="use pcbedge build for the default runner's bundles")
    if any(v != "fp32" for v in manifest["precision"].values()):
        raise BundleError(f"{export_dir} is already quantized ({manifest['precision']})",
                          fix="quantize the FP32 export made by pcbedge export")
    images = [np.asarray(im) for im in (calibration or [])]
    static = [g for g, s in (("vision", config.vision), ("decoder", config.decoder))
              if s.endswith("_static")]
    if static and not images:
        raise CalibrationError(f"static quantization of {static} got no calibration image",
                               fix="pass calibration=[uint8 RGB board images]")
    runner = QwenRunner(export_dir, threads=None)
    reports = {}
    with staged_dir(out_dir, overwrite=overwrite) as stage:
        for name in manifest["files"]:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(export_dir / name, stage / name)
        for graph, scheme in (("vision", config.vision), ("decoder", config.decoder)):
            if scheme == "fp32":
                continue
            file = manifest["graphs"][graph]["file"]
            for p in stage.glob(f"{file}*"):
                p.unlink()
            reports[graph] = QUANTIZERS[(graph, scheme)](
                export_dir / file, stage / file, runner, images, config)
        manifest = dict(manifest)
        manifest["precision"] = {"vision": PRECISION[config.vision],
                                 "decoder": PRECISION[config.decoder]}
        manifest["quantization"] = {"config": asdict(config),
                                    "calibration_images": len(images),
                                    "graphs": _summaries(reports)}
        manifest["files"] = list_files(stage)
        write_manifest(stage, manifest, partial=True)
    return Path(out_dir)


def _summaries(reports: dict) -> dict:
    """Per graph: the scheme's fields, and for QDQ graphs how many ops got Q/DQ."""
    out = {}
    for g, r in reports.items():
        s = {k: r[k] for k in ("scheme", "block_size", "symmetric", "op_types",
                               "calibration_samples") if k in r}
        if "quantized_nodes" in r:
            s.update(scheme="int8_static", quantized_ops=len(r["quantized_nodes"]),
                     quantized_by_op_type=r["quantized_by_op_type"],
                     float_by_op_type=r["float_by_op_type"])
        out[g] = s
    return out
