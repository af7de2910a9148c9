"""ONNX Runtime sessions of a bundle: providers, threads, spin-wait, architecture, one session
per graph. Every family's ONNX runner opens its bundle through :func:`open_sessions`."""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from pcbedge.bundle.manifest import safe_path
from pcbedge.errors import BundleError, HardwareMismatchError, TargetError
from pcbedge.runtime.int8_kernels import saturation_warning
from pcbedge.runtime.vocabulary import DEFAULT_SPIN_WAIT, SPIN_WAITS, normalize_arch

log = logging.getLogger(__name__)

_LEVELS = {"ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
           "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
          "parallel": ort.ExecutionMode.ORT_PARALLEL}

# When the intra-op threads spin-wait for work. A runner runs several sessions in turn (vision,
# prefill, step), each with its own thread pool; with onnxruntime's default ("always") a pool
# keeps spinning after its Run() returns and takes the cores from the next session and from
# preprocessing: on the 2-core reference box the whole answer ran at P50 88 ms that way against
# 45 ms with "during_run" (docs/build.md). "never" also stops spinning inside a run.
SPIN_WAIT = {"during_run": {"session.force_spinning_stop": "1"},
             "always": {},
             "never": {"session.intra_op.allow_spinning": "0"}}
assert tuple(SPIN_WAIT) == SPIN_WAITS   # one vocabulary: the profile's


@dataclass
class BundleSessions:
    """The sessions of one bundle, keyed by graph role, with what they were opened with."""

    bundle_dir: Path
    manifest: dict
    sessions: dict
    providers: list[str]
    threads: int | None

    def __getitem__(self, role: str):
        return self.sessions[role]

    def output_names(self, role: str) -> list[str]:
        return [o.name for o in self.sessions[role].get_outputs()]

    def input_names(self, role: str) -> list[str]:
        return [i.name for i in self.sessions[role].get_inputs()]


def open_bundle(bundle_dir, manifest: dict | None, *, graphs, parser: str, verify: bool = True,
                threads=None, providers=None):
    """What every ONNX runner does first: read (and verify) the manifest unless it was given,
    check its graphs and answer parser, open the tokenizer and one session per graph.
    Returns ``(bundle_dir, manifest, tokenizer, BundleSessions)``."""
    from pcbedge.bundle.manifest import read_manifest, verify_files

    bundle_dir = Path(bundle_dir)
    if manifest is None:
        manifest = read_manifest(bundle_dir)
        if verify:
            verify_files(bundle_dir, manifest)
    require_graphs(bundle_dir, manifest, graphs)
    got = (manifest.get("answer") or {}).get("parser")
    if got != parser:
        raise BundleError(f"bundle {bundle_dir} uses the answer parser {got!r}, unknown to this "
                          f"pcbedge for family {manifest.get('family')!r} (known: {parser})",
                          fix="upgrade pcbedge")
    sessions = open_sessions(bundle_dir, manifest, threads=threads, providers=providers)
    return bundle_dir, manifest, load_tokenizer(bundle_dir, manifest), sessions


def require_graphs(bundle_dir: Path, manifest: dict, roles) -> None:
    """BundleError unless the manifest names a graph for every role the runner needs."""
    missing = [r for r in roles if r not in manifest["graphs"]]
    if missing:
        raise BundleError(f"bundle {bundle_dir} ({manifest.get('family')}) names no graph for "
                          f"{missing}", fix=f"a bundle of this family holds the graphs "
                                            f"{list(roles)}; export it again")


def open_sessions(bundle_dir: Path, manifest: dict, *, threads=None,
                  providers=None) -> BundleSessions:
    """Check the architecture, providers and threads, then open one session per graph."""
    check_arch(bundle_dir, manifest)
    clipping = saturation_warning(manifest)
    if clipping:
        log.warning("warning: bundle %s: %s", bundle_dir, clipping)
    runtime = manifest.get("runtime") or {}
    engine = runtime.get("engine", "onnxruntime")
    if engine != "onnxruntime" and providers is None:
        raise HardwareMismatchError(
            f"bundle {bundle_dir} is built for the {engine!r} runtime, not onnxruntime",
            fix=f"run it with the {engine} runner on its target, or pass providers=[...] "
                "to run its ONNX graphs with ONNX Runtime anyway")
    providers = check_providers(providers if providers is not None else runtime.get("providers"))
    threads = check_threads(threads if threads is not None else runtime.get("threads"))
    opts = session_options(runtime, threads)
    sessions = {}
    for role, g in manifest["graphs"].items():
        path = safe_path(bundle_dir, g["file"])
        try:
            sessions[role] = ort.InferenceSession(str(path), sess_options=opts,
                                                  providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{g['file']} of bundle {bundle_dir} cannot be loaded by "
                              f"onnxruntime {ort.__version__}: {e}",
                              fix="export the bundle again with this pcbedge") from None
    return BundleSessions(bundle_dir, manifest, sessions, providers, threads)


def load_tokenizer(bundle_dir: Path, manifest: dict):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(safe_path(bundle_dir, manifest["tokenizer"])))


def session_options(runtime: dict, threads: int | None) -> ort.SessionOptions:
    """Session options from the manifest's runtime block (optimisation level ALL and spin-wait
    during runs only, unless it says otherwise) and the intra-op thread count."""
    level = runtime.get("graph_optimization_level") or "ORT_ENABLE_ALL"
    mode = runtime.get("execution_mode") or "sequential"
    inter = runtime.get("inter_op_threads")
    spin = runtime.get("spin_wait") or DEFAULT_SPIN_WAIT
    if level not in _LEVELS or mode not in _MODES or spin not in SPIN_WAIT:
        raise BundleError(f"manifest runtime block has graph_optimization_level {level!r}, "
                          f"execution_mode {mode!r}, spin_wait {spin!r}",
                          fix=f"valid: {', '.join(_LEVELS)}; {', '.join(_MODES)}; "
                              f"{', '.join(SPIN_WAIT)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[level]
    opts.execution_mode = _MODES[mode]
    opts.log_severity_level = 3
    for key, value in SPIN_WAIT[spin].items():
        opts.add_session_config_entry(key, value)
    if threads is not None:
        opts.intra_op_num_threads = threads
    if inter is not None:
        opts.inter_op_num_threads = check_threads(inter)
    return opts


def check_providers(requested) -> list[str]:
    available = ort.get_available_providers()
    wanted = list(requested) if requested else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise HardwareMismatchError(
            f"ONNX Runtime execution provider(s) {missing} are not available on this machine",
            fix=f"available providers: {', '.join(available)}; pass providers=[...] with those, "
                "or install the onnxruntime build for this hardware")
    return wanted


def check_threads(threads) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise TargetError(f"threads={threads!r} is not a positive integer",
                          fix="use the number of CPU cores to use, or None for the default")
    return threads


# Set to 1 only to compare one bundle's answers across instruction sets (scripts/arm64_check.py
# runs an arm64 bundle on the x86 build host as the reference of its arm64 run).
FOREIGN_ARCH_ENV = "PCBEDGE_ALLOW_FOREIGN_ARCH"


def check_arch(bundle_dir: Path, manifest: dict) -> None:
    """A bundle built for a target names its CPU architecture; refuse to run it on another
    (unless ``PCBEDGE_ALLOW_FOREIGN_ARCH=1``: cross-ISA agreement checks)."""
    import os

    target = manifest.get("target") or {}
    want = target.get("arch")
    have = platform.machine()
    if os.environ.get(FOREIGN_ARCH_ENV) == "1":
        return
    if want and have and normalize_arch(want) != normalize_arch(have):
        raise HardwareMismatchError(
            f"bundle {bundle_dir} was built for target {target.get('name')!r} on {want}, "
            f"but this machine is {have}",
            fix=f"build a bundle for this machine: pcbedge build --target <a {have} target>")
