"""``build_bundle``: apply a target profile's recipe to an FP32 export, atomically.

Steps: load the profile -> read and verify the export (it must be FP32) -> pick the calibration
set -> copy the graphs into a staging folder -> quantize the graphs the profile wants in INT8
(Q/DQ, calibrated on the set) and measure their drift -> the runtime's own step (session options
for onnxruntime; static parser checks, engines or their deferred build for TensorRT) -> manifest
(written last) -> rename into place. Everything the build did is in the bundle's manifest.
"""
from __future__ import annotations

import copy
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from pcbedge.errors import BundleError, CalibrationError, OutputError, TargetError

log = logging.getLogger(__name__)

DEFAULT_OUT_ROOT = Path("bundles")
DRIFT_BOARDS = 8          # bench boards (validation side) the quantization drift is measured on
# graphs of each precision key of a profile
GRAPHS_OF = {"vision": ("vision",), "decoder": ("decoder_prefill", "decoder_step")}
ORT_LEVEL = "ORT_ENABLE_ALL"

__all__ = ["build_bundle", "read_export"]


def build_bundle(target, export_dir: str | Path = "bundles/export",
                 out_dir: str | Path | None = None, *, calibration: str | Path | None = None,
                 calibration_list: str | Path | None = None,
                 keep_ratio: float | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Build the bundle of ``target`` (a shipped name, a .toml path or a TargetProfile) from the
    FP32 export in ``export_dir`` into ``out_dir`` (default ``bundles/<target>``) and return it.

    ``calibration``: a folder of boards for the INT8 scales (default: the embedded sample's
    calib.txt); ``calibration_list``: a DeepPCB list file naming the boards of that folder to
    draw from (e.g. the train side only). ``keep_ratio`` overrides the profile's visual-token keep ratio. An existing,
    non-empty ``out_dir`` is an OutputError unless ``overwrite``.
    """
    from pcbedge.export.atomic import staged_dir
    from pcbedge.export.manifest import write_manifest
    from pcbedge.targets import load_target

    profile = load_target(target)
    export_dir = Path(export_dir)
    source = read_export(export_dir)
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / profile.name
    if out_dir.absolute().resolve() == export_dir.absolute().resolve():
        raise OutputError(f"the build would overwrite its own export {export_dir}",
                          fix="pass another out_dir (default bundles/<target>)")
    _check_supported(profile)
    pruning = pruning_for(profile, keep_ratio)
    cal_set = calibration_for(profile, calibration, calibration_list)
    say = _reporter(progress)
    say(f"building {profile.name} ({profile.runtime}, vision {profile.precision.vision}, "
        f"decoder {profile.precision.decoder}) from {export_dir}")
    with staged_dir(out_dir, overwrite=overwrite) as stage:
        manifest = assemble(stage, export_dir, source, profile, pruning, cal_set, say)
        write_manifest(stage, manifest, partial=True)   # revealed as manifest.json last
    say(f"bundle written to {out_dir}")
    return out_dir


def read_export(export_dir: Path) -> dict:
    """The export's manifest, its files verified, refused unless every graph is FP32."""
    from pcbedge.export.manifest import DEFAULT_RUNNER, read_manifest, verify_files

    manifest = read_manifest(export_dir)
    verify_files(export_dir, manifest)
    if manifest.get("runner", DEFAULT_RUNNER) != DEFAULT_RUNNER:
        raise BundleError(f"{export_dir} is a {manifest['family']} export (runner "
                          f"{manifest['runner']!r}); pcbedge build handles the default "
                          "runner's graphs only",
                          fix="quantize it with benchmarks/qwen_quant.py (docs/qwen2-vl.md)")
    precision = manifest.get("precision") or {}
    not_fp32 = {k: v for k, v in precision.items() if v != "fp32"}
    if not_fp32 or manifest.get("quantization") or manifest.get("target"):
        raise BundleError(f"{export_dir} is not an FP32 export (precision {precision}"
                          + (f", built for target {manifest['target'].get('name')!r}"
                             if manifest.get("target") else "") + ")",
                          fix="build from the FP32 export made by `pcbedge export`, not from "
                              "a built bundle")
    return manifest


def _check_supported(profile) -> None:
    if profile.precision.decoder == "int8":
        raise TargetError(
            f"target {profile.name}: precision.decoder = 'int8' is not built by pcbedge: "
            "measured on the x86 reference box, int8 MatMuls give the per-token decoder step "
            "nothing and the prefill ~1.6x at a 2-3% logits error (docs/build.md)",
            fix="set precision.decoder to 'fp32' (or 'fp16' for TensorRT)")
    if profile.runtime == "onnxruntime" and "fp16" in (profile.precision.vision,
                                                       profile.precision.decoder):
        raise TargetError(f"target {profile.name}: fp16 graphs for onnxruntime are not built "
                          "by pcbedge", fix="use 'fp32' or 'int8' for onnxruntime targets")


def pruning_for(profile, keep_ratio: float | None):
    """The profile's TokenPruningConfig, ``keep_ratio`` overriding its ratio."""
    from pcbedge.runtimes.pruning import TokenPruningConfig

    method = profile.pruning.method
    if keep_ratio is not None and method == "none" and keep_ratio != 1.0:
        raise TargetError(f"keep_ratio={keep_ratio!r} given, but target {profile.name} does not "
                          "prune visual tokens (pruning.method = 'none')",
                          fix="drop keep_ratio, or use a profile with a pruning method")
    ratio = profile.pruning.keep_ratio if keep_ratio is None else keep_ratio
    return TokenPruningConfig(method=method, keep_ratio=ratio)


def calibration_for(profile, calibration, calibration_list=None):
    """The calibration set of an INT8 build (None when no graph is INT8)."""
    from pcbedge.calibration import select_calibration_set
    from pcbedge.data.deeppcb import find_data_root

    int8 = "int8" in (profile.precision.vision, profile.precision.decoder)
    if not int8:
        if calibration is not None or calibration_list is not None:
            raise CalibrationError(f"a calibration folder was given, but target {profile.name} "
                                   "has no INT8 graph", fix="drop --calibration for this target")
        return None
    return select_calibration_set(find_data_root(calibration),
                                  n=profile.quantization.calibration_boards,
                                  list_file=calibration_list)


def _reporter(progress: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            print(f"[pcbedge build] {msg}", file=sys.stderr, flush=True)
    return say


# --- assembling the bundle ----------------------------------------------------------------------

def assemble(stage: Path, export_dir: Path, source: dict, profile, pruning, cal_set,
             say) -> dict:
    """Fill ``stage`` and return the bundle's manifest (files hashed, not yet written)."""
    from pcbedge.export.manifest import list_files, safe_path, sha256_file

    manifest = copy.deepcopy(source)
    for rel in source["files"]:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_path(export_dir, rel), dst)
    _set_input_size(manifest, profile.shapes.input_size, say)
    manifest["precision"] = {"vision": profile.precision.vision,
                             "decoder": profile.precision.decoder}
    for key, roles in GRAPHS_OF.items():
        for role in roles:
            manifest["graphs"][role]["precision"] = manifest["precision"][key]
    manifest["quantization"] = quantize_graphs(stage, export_dir, manifest, profile, cal_set, say)
    manifest["calibration"] = cal_set.to_manifest() if cal_set is not None else None
    manifest["pruning"] = pruning.to_dict()
    manifest["target"] = {**profile.as_dict(), "arch": profile.arch}
    manifest["reference"] = {"export_dir": str(export_dir.absolute().resolve()),
                             "manifest_sha256": sha256_file(export_dir / "manifest.json"),
                             "precision": source.get("precision")}
    manifest.update(RUNTIME_STEPS[profile.runtime](stage, manifest, profile, pruning, say))
    manifest["build"] = {"target": profile.name, "profile_source": profile.source,
                         "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "tools": _tool_versions()}
    manifest["files"] = list_files(stage)
    return manifest


def _set_input_size(manifest: dict, size: int, say) -> None:
    exported = int(manifest["input_size"])
    if size != exported:
        say(f"note: the export was made at {exported}x{exported}; target runs it at {size}x{size}"
            " (shapes.input_size of the profile; the vision graph takes any multiple of 32)")
    stride = int(manifest.get("visual_token_stride", 32))
    manifest["input_size"] = size
    manifest["visual_tokens"] = (size // stride) ** 2
    manifest.setdefault("preprocess", {})["input_size"] = size


def quantize_graphs(stage: Path, export_dir: Path, manifest: dict, profile, cal_set,
                    say) -> dict | None:
    """Quantize every graph the profile wants INT8; the manifest's ``quantization`` block."""
    from pcbedge.build.quantize import config_for_graph, measure_drift, quantize_graph
    from pcbedge.build.report import summarize
    from pcbedge.calibration import iter_vision_inputs

    config = config_for_graph(profile, "vision")
    if config is None:
        return None
    rel = manifest["graphs"]["vision"]["file"]
    size = int(manifest["input_size"])
    say(f"quantizing {rel} ({', '.join(config.op_types)}) on {len(cal_set)} calibration boards")
    for side in stage.glob(f"{rel}.data"):   # the quantized graph is written as one file
        side.unlink()
    report = quantize_graph(export_dir / rel, stage / rel, config,
                            iter_vision_inputs(cal_set, size))
    say(f"  Q/DQ placement: {summarize(report)}")
    bias = correct_score_bias(stage / rel, export_dir / rel, manifest, profile, cal_set, say)
    drift = measure_drift(export_dir / rel, stage / rel, _drift_feeds(size))
    det = drift.get("detections")
    say(f"  drift vs fp32 on {DRIFT_BOARDS} bench boards: visual tokens "
        f"{drift['visual_tokens']['mean']:.4f} (rel. L2)" + (
            f"; {100 * det['kept']:.1f}% of {det['fp32_detections']} fp32 detections kept"
            if det else ""))
    return {"scheme": config.scheme,
            "graphs": {"vision": {"config": config.to_dict(), "placement": report,
                                  "score_bias": bias, "drift_vs_fp32": drift}},
            "calibration_sha256": cal_set.sha256}


def correct_score_bias(graph: Path, reference: Path, manifest: dict, profile, cal_set,
                       say) -> dict | None:
    """The INT8 graph's detection scores brought back onto FP32's (pcbedge.build.score_bias),
    measured on up to ``score_bias_boards`` boards of the calibration source that the scales
    were not fitted to, in their 8 dihedral views; the manifest's record of it. Too few such
    boards or matched proposals: no correction, and the build says so."""
    from pcbedge.build.score_bias import (MIN_MATCHES, decision_band, dihedral_views,
                                          estimate_score_bias, fold_score_offset)
    from pcbedge.calibration import MIN_BOARDS, iter_vision_inputs, select_heldout_set

    n = profile.quantization.score_bias_boards
    if not n:
        return None
    held = select_heldout_set(cal_set, n)
    if len(held) < MIN_BOARDS:
        reason = (f"the calibration source {cal_set.root} holds {len(held)} board(s) beyond the "
                  f"{len(cal_set)} calibrated on; the correction needs at least {MIN_BOARDS} "
                  "(pass --calibration DIR with more boards of the line)")
        say(f"  score bias correction skipped: {reason}")
        return {"applied": False, "reason": reason}
    center = float((manifest.get("answer") or {}).get("grammar", {})
                   .get("region_prior_center", 0.5))
    est = estimate_score_bias(reference, graph,
                              dihedral_views(iter_vision_inputs(held, int(manifest["input_size"]))),
                              decision_band(center))
    record = {**est, "boards": [e.board_id for e in held.entries], "sha256": held.sha256}
    if est["matched"] < MIN_MATCHES:
        reason = (f"only {est['matched']} proposals in the decision band on {len(held)} boards "
                  f"(needs {MIN_MATCHES})")
        say(f"  score bias correction skipped: {reason}")
        return {**record, "applied": False, "reason": reason}
    conv = fold_score_offset(graph, est["offset"])
    say(f"  score bias: int8 scored fp32's proposals {est['offset']:+.4f} logit "
        f"(+- {est['stderr']:.4f}, {est['matched']} matched, {len(held)} held-out boards x 8 "
        f"views); subtracted from {conv}'s bias")
    return {**record, "applied": True, "conv": conv}


def _drift_feeds(size: int):
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.data.preprocess import load_pair

    for b in read_list(find_data_root(None), "bench.txt")[:DRIFT_BOARDS]:
        yield {"pixel_values": load_pair(b.test_path, b.template_path, size)[0][None]}


def _finish_onnxruntime(stage: Path, manifest: dict, profile, pruning, say) -> dict:
    """Session options; the graphs stay portable ONNX (the runtime optimises them at load with
    ORT_ENABLE_ALL, whose layout transforms are specific to the machine it runs on)."""
    return {"runtime": {"engine": "onnxruntime", "providers": list(profile.providers),
                        "threads": profile.threads, "inter_op_threads": 1,
                        "graph_optimization_level": ORT_LEVEL, "execution_mode": "sequential",
                        "spin_wait": profile.spin_wait}}


def _finish_tensorrt(stage: Path, manifest: dict, profile, pruning, say) -> dict:
    """Static parser checks (hard blockers fail the build), then engines or their deferred
    build files."""
    from pcbedge.build.tensorrt import apply_tensorrt
    from pcbedge.build.trt_ops import check_graphs, raise_on_blockers

    graphs = {role: stage / g["file"] for role, g in manifest["graphs"].items()}
    validation = check_graphs(graphs, profile.tensorrt.version)
    say(f"TensorRT {profile.tensorrt.version} parser check: {validation['blockers']} blocker(s), "
        f"{validation['warnings']} warning(s)")
    raise_on_blockers(validation)
    block = apply_tensorrt(stage, manifest, profile, pruning, say=say)
    return {"tensorrt": block, "trt_validation": validation,
            "runtime": {"engine": "tensorrt", "providers": [], "threads": profile.threads,
                        "engines": block["engines"]}}


RUNTIME_STEPS: dict[str, Callable[..., dict]] = {"onnxruntime": _finish_onnxruntime,
                                                 "tensorrt": _finish_tensorrt}


def _tool_versions() -> dict:
    import importlib.metadata as md
    out = {}
    for dist in ("onnxruntime", "onnx", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
