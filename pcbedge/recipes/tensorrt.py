"""TensorRT engines of a bundle: built here when this host can, else deferred to the device.

Engines are tied to the GPU model, its compute capability and the exact TensorRT version, so
they are only built when ``tensorrt`` imports, a GPU answers, and the host matches the target's
architecture and TensorRT major.minor. Otherwise the bundle carries everything the device needs
to build them itself: the graphs, ``trt/profiles.json`` (the optimisation-profile shapes) and
``trt/build.sh`` (the exact ``trtexec`` commands); the manifest says ``engines: deferred``.

INT8 is explicit: the Q/DQ nodes of the quantized graphs carry the scales (TensorRT 11 removed
implicit-calibration INT8, TensorRT 10 deprecates it). The engine-build code has been exercised
against a stand-in of the tensorrt API only (tests/test_tensorrt_standin.py), not real TensorRT.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
from pathlib import Path

from pcbedge.errors import ExportError, HardwareMismatchError

log = logging.getLogger(__name__)

ENGINES_DEFERRED = "deferred: build on device with trt/build.sh"
ENGINES_BUILT = "built"
TRT_DIR = "trt"
# Builder flags per graph precision: INT8 graphs carry Q/DQ (explicit quantization) and let the
# layers between them run FP16; FP16 graphs are FP32 ONNX built with the FP16 flag.
PRECISION_FLAGS = {"int8": ("int8", "fp16"), "fp16": ("fp16",), "fp32": ()}


# --- shapes -------------------------------------------------------------------------------------

def graph_shapes(record: dict, ranges: dict) -> dict[str, dict[str, list[int]]]:
    """{input: {"min", "opt", "max"}} for one graph record of the manifest."""
    out = {}
    for spec in record["inputs"]:
        dims = {"min": [], "opt": [], "max": []}
        for axis, d in enumerate(spec["shape"]):
            if isinstance(d, int):
                lo = opt = hi = d
            elif d in ranges:
                lo, opt, hi = ranges[d]
            else:
                raise ExportError(f"{record['file']} input {spec['name']} axis {axis} is the "
                                  f"dynamic axis {d!r}, which has no TensorRT shape range",
                                  fix="add it to the family's trt_axis_ranges")
            for key, v in zip(("min", "opt", "max"), (lo, opt, hi)):
                dims[key].append(int(v))
        out[spec["name"]] = dims
    return out


def plan_engines(manifest: dict, profile, ranges: dict) -> dict:
    """What ``trt/profiles.json`` holds: per graph its ONNX file, engine file, builder flags and
    the optimisation profile of every input. ``ranges``: (min, opt, max) of every dynamic axis
    (the family's :meth:`trt_axis_ranges`); a graph's precision is its manifest record's."""
    graphs = {}
    for role, record in manifest["graphs"].items():
        precision = record.get("precision", "fp32")
        graphs[role] = {"onnx": record["file"], "engine": f"{TRT_DIR}/{role}.engine",
                        "precision": precision, "flags": list(PRECISION_FLAGS[precision]),
                        "shapes": graph_shapes(record, ranges)}
    t = profile.tensorrt
    return {"tensorrt_version": t.version, "workspace_mb": t.workspace_mb,
            "builder_optimization_level": t.builder_optimization_level,
            "axis_ranges": {k: list(v) for k, v in ranges.items()}, "graphs": graphs}


# --- deferred build: trtexec script -------------------------------------------------------------

def _shape_arg(shapes: dict, key: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[key])}" for name, s in shapes.items())


def trtexec_command(g: dict, plan: dict) -> list[str]:
    cmd = ["\"$TRTEXEC\"", f"--onnx={g['onnx']}", f"--saveEngine={g['engine']}",
           f"--minShapes={_shape_arg(g['shapes'], 'min')}",
           f"--optShapes={_shape_arg(g['shapes'], 'opt')}",
           f"--maxShapes={_shape_arg(g['shapes'], 'max')}",
           *[f"--{flag}" for flag in g["flags"]],
           f"--memPoolSize=workspace:{plan['workspace_mb']}M",
           f"--builderOptimizationLevel={plan['builder_optimization_level']}"]
    return cmd


def build_script(plan: dict, target_name: str) -> str:
    """``trt/build.sh``: run from anywhere, builds every engine next to the graphs."""
    lines = [
        "#!/usr/bin/env bash",
        f"# TensorRT engines of this bundle (target {target_name}), built ON THE DEVICE:",
        "# engines only run on the GPU model and TensorRT version that built them.",
        f"# Expected TensorRT {plan['tensorrt_version']}.x. Shapes: trt/profiles.json.",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if [ ! -x "$TRTEXEC" ]; then',
        '  echo "trtexec not found; set TRTEXEC=/path/to/trtexec (JetPack: '
        '/usr/src/tensorrt/bin/trtexec)" >&2',
        "  exit 2",
        "fi",
    ]
    for role, g in plan["graphs"].items():
        cmd = " \\\n    ".join(trtexec_command(g, plan))
        lines += [f'echo "building {g["engine"]} ({g["precision"]})"',
                  f"{cmd} \\\n    2>&1 | tee {TRT_DIR}/{role}.log"]
    lines.append('echo "engines written to trt/; the runner checks them against this GPU"')
    return "\n".join(lines) + "\n"


def write_deferred(stage: Path, plan: dict, target_name: str) -> None:
    (stage / TRT_DIR).mkdir(exist_ok=True)
    (stage / TRT_DIR / "profiles.json").write_text(json.dumps(plan, indent=2) + "\n")
    script = stage / TRT_DIR / "build.sh"
    script.write_text(build_script(plan, target_name))
    script.chmod(0o755)


# --- host checks --------------------------------------------------------------------------------

def host_arch() -> str:
    from pcbedge.runtime.vocabulary import normalize_arch
    return normalize_arch(platform.machine())


def gpu_info() -> tuple[str, str] | None:
    """(GPU name, compute capability "8.7") of device 0, or None without a GPU."""
    for probe in (_gpu_from_cuda_python, _gpu_from_nvidia_smi):
        try:
            found = probe()
        except Exception as e:  # a missing library or driver: try the next probe
            log.debug("GPU probe %s failed: %s", probe.__name__, e)
            continue
        if found:
            return found
    return None


def _gpu_from_cuda_python():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def _gpu_from_nvidia_smi():
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    first = out.strip().splitlines()[0]
    name, cc = (x.strip() for x in first.rsplit(",", 1))
    return name, cc


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def why_not_build_here(trt, profile) -> str | None:
    """None when this host can build the target's engines, else the reason (for the manifest)."""
    if trt is None:
        return "tensorrt is not installed on the build host"
    if host_arch() != profile.arch:
        return f"build host is {host_arch()}, target is {profile.arch}"
    want = profile.tensorrt.version.split(".")[:2]
    have = str(trt.__version__).split(".")[:2]
    if have != want:
        return (f"build host has TensorRT {trt.__version__}, target expects "
                f"{profile.tensorrt.version}")
    if gpu_info() is None:
        return "no NVIDIA GPU found on the build host"
    return None


# --- engine build (tensorrt Python API) ---------------------------------------------------------

def build_engines(stage: Path, plan: dict, trt) -> dict:
    """Build every engine of ``plan`` into ``stage`` with the tensorrt module ``trt``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines = {}
    for role, g in plan["graphs"].items():
        network = builder.create_network(0)   # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(stage / g["onnx"])):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(f"TensorRT could not parse {g['onnx']}: {'; '.join(errors[:3])}",
                              fix="see trt_validation in the manifest and docs/build.md")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_mb"] << 20)
        config.builder_optimization_level = plan["builder_optimization_level"]
        for flag in g["flags"]:
            config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
        opt_profile = builder.create_optimization_profile()
        for name, s in g["shapes"].items():
            opt_profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        config.add_optimization_profile(opt_profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ExportError(f"TensorRT failed to build the engine of {g['onnx']}",
                              fix="run trt/build.sh on the device to see trtexec's log")
        (stage / g["engine"]).write_bytes(bytes(blob))
        engines[role] = g["engine"]
    return engines


def apply_tensorrt(stage: Path, manifest: dict, profile, pruning, ranges: dict, *,
                   say=log.info) -> dict:
    """Write the deferred-build files, build the engines when this host can; return the
    manifest's ``tensorrt`` block. ``ranges``: the family's dynamic-axis ranges."""
    plan = plan_engines(manifest, profile, ranges)
    write_deferred(stage, plan, profile.name)
    trt = import_tensorrt()
    reason = why_not_build_here(trt, profile)
    block = {"version": profile.tensorrt.version, "profiles": f"{TRT_DIR}/profiles.json",
             "build_script": f"{TRT_DIR}/build.sh",
             "flags": {r: g["flags"] for r, g in plan["graphs"].items()}}
    if reason is not None:
        say(f"TensorRT engines deferred ({reason}): build them on the device with "
            f"{TRT_DIR}/build.sh")
        return {**block, "engines": ENGINES_DEFERRED, "deferred_reason": reason}
    name, cc = gpu_info()
    say(f"building TensorRT {trt.__version__} engines on {name} (sm {cc})")
    engines = build_engines(stage, plan, trt)
    return {**block, "engines": ENGINES_BUILT, "engine_files": engines,
            "built_with": {"gpu": name, "compute_capability": cc,
                           "tensorrt_version": str(trt.__version__)}}


# --- loader check -------------------------------------------------------------------------------

def check_engine_compat(manifest: dict, gpu_name: str, compute_capability: str,
                        trt_version: str) -> None:
    """HardwareMismatchError when the bundle's engines were built for another GPU, compute
    capability or TensorRT version than this device's (``gpu_name``, ``compute_capability``,
    ``trt_version``). A deferred bundle only needs the same TensorRT major version."""
    block = manifest.get("tensorrt") or {}
    here = f"{gpu_name} (compute capability {compute_capability}), TensorRT {trt_version}"
    if block.get("engines") == ENGINES_BUILT:
        b = block["built_with"]
        built = (f"{b['gpu']} (compute capability {b['compute_capability']}), "
                 f"TensorRT {b['tensorrt_version']}")
        same = (b["gpu"] == gpu_name and str(b["compute_capability"]) == str(compute_capability)
                and _release(b["tensorrt_version"]) == _release(trt_version))
        if not same:
            raise HardwareMismatchError(
                f"the TensorRT engines of this bundle were built for {built}; this device is "
                f"{here}", fix="rebuild the engines on this device: bash trt/build.sh (or "
                               "pcbedge build on the device)")
        return
    want = str(block.get("version", "")).split(".")[0]
    if want and str(trt_version).split(".")[0] != want:
        raise HardwareMismatchError(
            f"this bundle's graphs were checked for TensorRT {block['version']}; this device "
            f"has {here}", fix=f"install TensorRT {want}.x (JetPack 6 ships 10.3) or build the "
                               "bundle for a target profile with this TensorRT version")


def _release(version: str) -> list[str]:
    """major.minor.patch: engines are not portable across TensorRT releases."""
    return str(version).split(".")[:3]

