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
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from pcbedge.bundle.graph_io import shareable, side_car
from pcbedge.errors import BundleError, CalibrationError, OutputError, TargetError
from pcbedge.export.precision import graph_precision
from pcbedge.recipes.widen import set_aside, settle, widen_export

log = logging.getLogger(__name__)

DEFAULT_OUT_ROOT = Path("bundles")
ORT_LEVEL = "ORT_ENABLE_ALL"

__all__ = ["build_bundle", "read_export"]


def build_bundle(target, export_dir: str | Path = "bundles/export",
                 out_dir: str | Path | None = None, *, calibration: str | Path | None = None,
                 calibration_list: str | Path | None = None,
                 keep_ratio: float | None = None, overwrite: bool = False,
                 sign_key: str | Path | None = None, progress: bool = True) -> Path:
    """Build the bundle of ``target`` (a shipped name, a .toml path or a TargetProfile) from the
    FP32 export in ``export_dir`` into ``out_dir`` (default ``bundles/<target>``) and return it.

    ``calibration``: a folder of boards for the INT8 scales (default: the embedded sample's
    calib.txt); ``calibration_list``: a DeepPCB list file naming the boards of that folder to
    draw from (e.g. the train side only). ``keep_ratio`` overrides the profile's visual-token keep ratio. An existing,
    non-empty ``out_dir`` is an OutputError unless ``overwrite``. ``sign_key``: an Ed25519
    private key PEM; the bundle then carries ``manifest.sig`` (pcbedge.bundle.signing), written
    in the staging folder so it is in place before the manifest appears.
    """
    from pcbedge.bundle.atomic import check_output, staged_dir
    from pcbedge.bundle.outputs import tree_bytes
    from pcbedge.bundle.manifest import write_manifest
    from pcbedge.targets import load_target

    from pcbedge.families import get_family

    profile = load_target(target)
    signer = signing_key_for(profile, sign_key)   # a bad key fails before minutes of work
    export_dir = Path(export_dir)
    source = read_export(export_dir)
    family = get_family(source["family"])
    profile = profile.for_family(family.profile_key or family.name)
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / profile.name
    if out_dir.absolute().resolve() == export_dir.absolute().resolve():
        raise OutputError(f"the build would overwrite its own export {export_dir}",
                          fix="pass another out_dir (default bundles/<target>)")
    # before any long step, and before anything is deleted: out_dir never overlaps an input,
    # and only a bundle pcbedge made is replaced
    inputs = {"export": export_dir, "calibration folder": calibration,
              "calibration list": calibration_list}
    check_output(out_dir, overwrite=overwrite, inputs=inputs)
    _check_supported(profile)
    pruning = pruning_for(profile, keep_ratio, source)
    cal_set = calibration_for(profile, calibration, calibration_list)
    say = _reporter(progress)
    say(f"building {profile.name} for {family.name} ({profile.runtime}, vision "
        f"{profile.precision.vision}, decoder {profile.precision.decoder}) from {export_dir}")
    # the bundle holds a copy of the export's files, then the quantized graphs
    with staged_dir(out_dir, overwrite=overwrite, inputs=inputs,
                    needed=tree_bytes(export_dir)) as stage:
        manifest = assemble(stage, export_dir, source, family, profile, pruning, cal_set, say)
        written = write_manifest(stage, manifest, partial=True)   # revealed as manifest.json last
        if signer is not None:
            from pcbedge.bundle.signing import write_signature
            write_signature(stage, written.read_bytes(), signer)
            say(f"signed with key {signer.key_id} ({signer.path})")
    say(f"bundle written to {out_dir}")
    return out_dir


def signing_key_for(profile, sign_key):
    """The loaded signing key, or None; TargetError when the profile requires a signature and
    no key is given."""
    if sign_key is None:
        if profile.security.require_signature:
            raise TargetError(f"target {profile.name} requires signed bundles ([security] "
                              f"require_signature = true in {profile.source})",
                              fix="pass --sign sign_key.pem (pcbedge keygen --out DIR makes a "
                                  "key pair)")
        return None
    from pcbedge.bundle.signing import load_signing_key
    return load_signing_key(sign_key)


def read_export(export_dir: Path) -> dict:
    """The export's manifest, its files verified, refused unless every graph is FP32."""
    from pcbedge.bundle.manifest import read_manifest, verify_files

    manifest = read_manifest(export_dir)
    verify_files(export_dir, manifest)
    floats = graph_precision(manifest)
    if floats == "bf16":
        raise BundleError(f"{export_dir} holds bf16 graphs: onnxruntime's CPU provider, which "
                          "the build calibrates and checks drift with, has no bf16 kernels",
                          fix="export with --precision fp16 (or fp32) to build from it")
    precision = manifest.get("precision") or {}
    not_float = {k: v for k, v in precision.items() if v != floats}
    if not_float or manifest.get("quantization") or manifest.get("target"):
        raise BundleError(f"{export_dir} is not a float export (precision {precision}"
                          + (f", built for target {manifest['target'].get('name')!r}"
                             if manifest.get("target") else "") + ")",
                          fix="build from the float export made by `pcbedge export`, not from "
                              "a built bundle")
    return manifest


def _check_supported(profile) -> None:
    if profile.runtime == "onnxruntime" and "fp16" in (profile.precision.vision,
                                                       profile.precision.decoder):
        raise TargetError(f"target {profile.name}: fp16 graphs for onnxruntime are not built "
                          "by pcbedge", fix="use 'fp32' or 'int8' for onnxruntime targets")


def pruning_for(profile, keep_ratio: float | None, manifest: dict | None = None):
    """The profile's TokenPruningConfig, ``keep_ratio`` overriding its ratio; TargetError when
    the export's family has no token score for the profile's method."""
    from pcbedge.runtime.pruning import TokenPruningConfig

    method = profile.pruning.method
    scores = (manifest or {}).get("token_scores") or {}
    if manifest is not None and method != "none" and method not in scores:
        raise TargetError(f"target {profile.name}: pruning method {method!r} has no token score "
                          f"in this {manifest['family']} export (it scores: "
                          f"{', '.join(scores) or 'none'})",
                          fix=f"set [family.{manifest['family']}.pruning] method in the profile "
                              "to one of those, or 'none'")
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

    from pcbedge.recipes.configs import config_for_group
    configs = [config_for_group(profile, g) for g in ("vision", "decoder")]
    if not any(c is not None and c.needs_calibration for c in configs):
        if calibration is not None or calibration_list is not None:
            raise CalibrationError(f"a calibration folder was given, but target {profile.name} "
                                   "has no statically calibrated graph",
                                   fix="drop --calibration for this target")
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

def assemble(stage: Path, export_dir: Path, source: dict, family, profile, pruning, cal_set,
             say) -> dict:
    """Fill ``stage`` and return the bundle's manifest (files hashed, not yet written)."""
    from pcbedge.bundle.manifest import list_files, safe_path, sha256_file

    manifest = copy.deepcopy(source)
    for rel in source["files"]:
        link_or_copy(safe_path(export_dir, rel), stage / rel)
    # an fp16 export: every graph widened to float32 first (quantizers and CPU kernels need it)
    widened = (widen_export(stage, export_dir, manifest, say)
               if graph_precision(source) != "fp32" else set())
    family.apply_shapes(manifest, profile.shapes, say)
    manifest["precision"] = {"vision": profile.precision.vision,
                             "decoder": profile.precision.decoder}
    groups = graph_groups(manifest, family)
    for group, roles in groups.items():
        for role in roles:
            manifest["graphs"][role]["precision"] = manifest["precision"][group]
    manifest["quantization"] = quantize_groups(stage, export_dir, manifest, groups, family,
                                               profile, cal_set, say, widened)
    settle(stage)
    manifest["calibration"] = cal_set.to_manifest() if cal_set is not None else None
    manifest["pruning"] = pruning.to_dict()
    manifest["target"] = {**profile.as_dict(), "arch": profile.arch}
    manifest["reference"] = {"export_dir": str(export_dir.absolute().resolve()),
                             "manifest_sha256": sha256_file(export_dir / "manifest.json"),
                             "precision": source.get("precision"),
                             "export_precision": graph_precision(source)}
    manifest.update(RUNTIME_STEPS[profile.runtime](stage, manifest, family, profile, pruning,
                                                   say))
    manifest["build"] = {"target": profile.name, "profile_source": profile.source,
                         "profile_family_overrides": profile.family or None,
                         "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "tools": _tool_versions()}
    shareable(stage)
    manifest["files"] = list_files(stage)
    return manifest


LINK_BYTES = 64 << 20   # export files this large are hard-linked into the stage, not copied


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src``; a file of ``LINK_BYTES`` or more (a 2B model's FP32 weights
    are ~9 GB) as a hard link where the export shares the file system. Nothing in a stage is
    written in place: a graph is unlinked before its quantized form is written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.stat().st_size >= LINK_BYTES:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def graph_groups(manifest: dict, family) -> dict[str, tuple[str, ...]]:
    """The export's graph groups (its manifest's ``graph_groups``; the family's declaration
    for exports made before the field existed)."""
    groups = manifest.get("graph_groups") or family.graph_groups
    unknown = [r for roles in groups.values() for r in roles if r not in manifest["graphs"]]
    if set(groups) - {"vision", "decoder"} or unknown:
        raise BundleError(f"the export's graph_groups {groups} do not match its graphs "
                          f"{list(manifest['graphs'])}", fix="export the model again")
    return {g: tuple(roles) for g, roles in groups.items()}


def quantize_groups(stage: Path, export_dir: Path, manifest: dict, groups: dict, family,
                    profile, cal_set, say, widened: set | None = None) -> dict | None:
    """Quantize each graph group as the profile's recipe says; the manifest's ``quantization``
    block (per graph: config, report; per group: the family's after-quantization record).
    ``widened``: the roles of an fp16 export widened in the stage, quantized from their widened
    form instead of the export's own file."""
    from pcbedge.recipes.configs import config_for_group
    from pcbedge.recipes.quantize import quantize_graph
    from pcbedge.recipes.report import summarize

    block = {"scheme": None, "graphs": {}, "groups": {},
             "calibration_sha256": cal_set.sha256 if cal_set is not None else None}
    for group, roles in groups.items():
        config = config_for_group(profile, group)
        if config is None:
            continue
        block["scheme"] = block["scheme"] or config.scheme
        for role in roles:
            rel = manifest["graphs"][role]["file"]
            feeds = (family.calibration_feeds(group, role, export_dir, manifest, cal_set)
                     if config.needs_calibration else None)
            say(f"quantizing {rel} ({group}: {config.scheme}" + (
                f", {', '.join(config.op_types)}, {len(cal_set)} calibration boards)"
                if config.needs_calibration else ")"))
            src = set_aside(stage, rel) if role in (widened or ()) else export_dir / rel
            for staged in (stage / rel, side_car(stage / rel)):   # links into the export
                staged.unlink(missing_ok=True)
            report = quantize_graph(src, stage / rel, config, feeds)
            if "quantized_nodes" in report:
                say(f"  Q/DQ placement: {summarize(report)}")
            block["graphs"][role] = {"config": config.to_dict(), "placement": report}
        block["groups"][group] = family.after_quantize(group, stage, export_dir, manifest,
                                                       profile, cal_set, say)
        for role in roles:   # per-graph records of the family (score bias, drift) stay readable
            block["graphs"][role].update(block["groups"][group].get("graphs", {}).get(role, {}))
    return block if block["graphs"] else None


def _finish_onnxruntime(stage: Path, manifest: dict, family, profile, pruning, say) -> dict:
    """Session options; the graphs stay portable ONNX (the runtime optimises them at load with
    ORT_ENABLE_ALL, whose layout transforms are specific to the machine it runs on)."""
    return {"runtime": {"engine": "onnxruntime", "providers": list(profile.providers),
                        "threads": profile.threads, "inter_op_threads": 1,
                        "graph_optimization_level": ORT_LEVEL, "execution_mode": "sequential",
                        "spin_wait": profile.spin_wait}}


def _finish_tensorrt(stage: Path, manifest: dict, family, profile, pruning, say) -> dict:
    """Static parser checks (hard blockers fail the build), then engines or their deferred
    build files."""
    from pcbedge.recipes.tensorrt import apply_tensorrt
    from pcbedge.recipes.trt_ops import check_graphs, raise_on_blockers

    graphs = {role: stage / g["file"] for role, g in manifest["graphs"].items()}
    validation = check_graphs(graphs, profile.tensorrt.version)
    say(f"TensorRT {profile.tensorrt.version} parser check: {validation['blockers']} blocker(s), "
        f"{validation['warnings']} warning(s)")
    raise_on_blockers(validation)
    block = apply_tensorrt(stage, manifest, profile, pruning,
                           family.trt_axis_ranges(manifest, profile, pruning), say=say)
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
