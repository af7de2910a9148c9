"""ONNX Runtime sessions of a bundle: providers, threads, spin-wait, architecture, one session
per graph. Every family's ONNX runner opens its bundle through :func:`open_sessions`."""
from __future__ import annotations

import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from pcbedge.bundle.manifest import MANIFEST, safe_path
from pcbedge.bundle.schema import MAX_THREADS, Violation
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
                threads=None, providers=None, sessions: bool = True):
    """What every ONNX runner does first: read the manifest unless it was given (validated,
    its signature checked when a trusted key is set, its files verified), check its graphs and
    answer parser, open the tokenizer and one session per graph (none with
    ``sessions=False``: the host side alone, e.g. a parity check's PyTorch phase).
    Returns ``(bundle_dir, manifest, tokenizer, BundleSessions)``."""
    from pcbedge.bundle.manifest import read_manifest_bytes, verify_files
    from pcbedge.bundle.signing import check_trust

    bundle_dir = Path(bundle_dir)
    trusted = False
    if manifest is None:
        manifest, data = read_manifest_bytes(bundle_dir)
        trusted = check_trust(bundle_dir, data, manifest)
        if verify or trusted:   # a signature vouches for the files only once they are checked
            verify_files(bundle_dir, manifest)
    require_graphs(bundle_dir, manifest, graphs)
    got = (manifest.get("answer") or {}).get("parser")
    if got != parser:
        raise BundleError(f"bundle {bundle_dir} uses the answer parser {got!r}, unknown to this "
                          f"pcbedge for family {manifest.get('family')!r} (known: {parser})",
                          fix="upgrade pcbedge")
    opened = (open_sessions(bundle_dir, manifest, threads=threads, providers=providers,
                            trusted=trusted) if sessions
              else BundleSessions(bundle_dir, manifest, {}, [], threads))
    return bundle_dir, manifest, load_tokenizer(bundle_dir, manifest), opened


def require_graphs(bundle_dir: Path, manifest: dict, roles) -> None:
    """BundleError unless the manifest names a graph for every role the runner needs."""
    missing = [r for r in roles if r not in manifest["graphs"]]
    if missing:
        raise BundleError(f"bundle {bundle_dir} ({manifest.get('family')}) names no graph for "
                          f"{missing}", fix=f"a bundle of this family holds the graphs "
                                            f"{list(roles)}; export it again")


def open_sessions(bundle_dir: Path, manifest: dict, *, threads=None, providers=None,
                  trusted: bool = False) -> BundleSessions:
    """Check the trust, the family's manifest fields, the architecture, providers and threads,
    then open one session per graph and check its inputs and outputs against the manifest.
    ``trusted``: the caller checked this manifest's signature and files (:func:`open_bundle`)."""
    bundle_dir = Path(bundle_dir)
    if not trusted:
        enforce_trust(bundle_dir, manifest)
    check_family_fields(bundle_dir, manifest)
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
    threads = (check_threads(threads) if threads is not None
               else fit_threads(runtime.get("threads"), f"bundle {bundle_dir}: runtime.threads"))
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
        check_graph_io(bundle_dir, role, g, sessions[role])
    return BundleSessions(bundle_dir, manifest, sessions, providers, threads)


def enforce_trust(bundle_dir: Path, manifest: dict) -> None:
    """For a runner that read the manifest itself: when a trusted key is set, the manifest it
    passes must be the signed ``manifest.json`` of ``bundle_dir``, whose files are then checked.
    A folder without ``manifest.json`` is a bundle being staged, whose manifest the calling code
    made in memory (export parity, build drift): there is nothing on disk to trust there."""
    from pcbedge.bundle.manifest import read_manifest_bytes, verify_files
    from pcbedge.bundle.signing import trusted_keys, verify_signature

    if not (bundle_dir / MANIFEST).is_file():
        return
    keys = trusted_keys(bundle_dir, manifest)
    if not keys:
        return
    signed, data = read_manifest_bytes(bundle_dir)
    for key in keys:
        verify_signature(bundle_dir, data, key)
    if signed != manifest:
        raise BundleError(f"the manifest passed for bundle {bundle_dir} is not its signed "
                          f"{MANIFEST}", fix="open the bundle from its folder (manifest=None)")
    verify_files(bundle_dir, signed)


def check_family_fields(bundle_dir: Path, manifest: dict) -> None:
    """The family's own manifest fields (its ``schema`` role module: ``MANIFEST``, a table of
    :mod:`pcbedge.bundle.schema` specs, and ``RULES``), checked before any graph runs."""
    from pcbedge.bundle.manifest import schema_error
    from pcbedge.bundle.schema import validate
    from pcbedge.families import get_family

    family = get_family(manifest["family"])
    if "schema" not in family.modules:
        return
    module = family.module("schema")
    try:
        for key, spec in module.MANIFEST.items():
            if key not in manifest:
                raise Violation(key, None, spec.expected(), "missing")
        validate(manifest, module.MANIFEST)
        for rule in getattr(module, "RULES", ()):
            rule(manifest)
    except Violation as v:
        raise schema_error(bundle_dir, v) from None


# onnxruntime's type names of the manifest's dtypes (others are not compared)
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
             "int32": "tensor(int32)", "int8": "tensor(int8)", "uint8": "tensor(uint8)",
             "bool": "tensor(bool)", "float64": "tensor(double)", "bfloat16": "tensor(bfloat16)"}


def check_graph_io(bundle_dir: Path, role: str, graph: dict, session) -> None:
    """The graph file holds the graph of its role: the names, types and ranks of its inputs and
    outputs are those the manifest declares (a decoder step graph put in the prefill graph's
    place, hashes updated, is refused here instead of failing inside an answer)."""
    for side, got in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = {t["name"]: t for t in graph.get(side) or ()}
        have = {t.name: t for t in got}
        problem = None
        if set(want) != set(have):
            problem = f"{side} {sorted(have)}, but the manifest declares {sorted(want)}"
        else:
            for name, spec in want.items():
                dtype, shape = ORT_TYPES.get(spec.get("dtype")), spec.get("shape")
                if dtype is not None and have[name].type != dtype:
                    problem = f"{side[:-1]} {name!r} of type {have[name].type}, not {dtype}"
                elif shape is not None and len(have[name].shape) != len(shape):
                    problem = (f"{side[:-1]} {name!r} of rank {len(have[name].shape)}, not "
                               f"{len(shape)}")
                if problem:
                    break
        if problem:
            raise BundleError(f"{graph['file']} of bundle {bundle_dir} is not its "
                              f"{role!r} graph: it has {problem}",
                              fix="the graph was swapped or replaced; copy the bundle again "
                                  "from its source, or export and build it again")


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
        opts.inter_op_num_threads = fit_threads(inter, "runtime.inter_op_threads")
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


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The most intra-op threads pcbedge starts: 4 per core, at most MAX_THREADS. Past a few
    per core the threads only fight for the cores: 256 threads on the 2-core box took 20.9 s
    for an answer that takes 0.5 s with 2, and 1000 did not answer within a minute."""
    return min(MAX_THREADS, 4 * available_cpus())


def check_threads(threads) -> int | None:
    """A thread count the caller asked for: None, or 1 to :func:`max_threads`."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise TargetError(f"threads={threads!r} is not a positive integer",
                          fix="use the number of CPU cores to use, or None for the default")
    cpus, most = available_cpus(), max_threads()
    if threads > most:
        raise TargetError(f"threads={threads} is more than this machine can use: it has {cpus} "
                          f"CPU core(s), and pcbedge starts at most {most} threads (4 per core)",
                          fix=f"use --threads {cpus} (threads={cpus}: one per core) or fewer; "
                              "more threads than cores only fight for them")
    return threads


def fit_threads(threads, what: str) -> int | None:
    """A bundle's own thread count (validated by the manifest schema, 1 to MAX_THREADS),
    clipped to the cores of this machine with a note: a bundle built for a bigger device still
    runs here, on the cores there are."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise BundleError(f"{what} = {threads!r} is not valid; expected an integer from 1 to "
                          f"{MAX_THREADS}", fix="export or build the bundle again")
    cpus = available_cpus()
    if threads > cpus:
        log.warning("note: %s = %d, but this machine has %d CPU core(s): using %d threads",
                    what, threads, cpus, cpus)
        return cpus
    return threads


# Set to 1 only to compare one bundle's answers across instruction sets (scripts/arm64_check.py
# runs an arm64 bundle on the x86 build host as the reference of its arm64 run).
FOREIGN_ARCH_ENV = "PCBEDGE_ALLOW_FOREIGN_ARCH"


def check_arch(bundle_dir: Path, manifest: dict) -> None:
    """A bundle built for a target names its CPU architecture (the manifest schema refuses a
    built bundle without one); refuse to run it on another (unless
    ``PCBEDGE_ALLOW_FOREIGN_ARCH=1``: cross-ISA agreement checks)."""
    target = manifest.get("target") or {}
    want = target.get("arch")
    have = platform.machine()
    if os.environ.get(FOREIGN_ARCH_ENV) == "1":
        return
    if want and have and normalize_arch(want) != normalize_arch(have):
        names = shipped_targets_for(have)
        how = (f"pcbedge build --target {' or --target '.join(names)}" if names else
               f"no shipped target is for {have}: write a profile with arch = \"{have}\" "
               "and pass it to pcbedge build --target (docs/targets.md)")
        raise HardwareMismatchError(
            f"bundle {bundle_dir} was built for target {target.get('name')!r} on {want}, "
            f"but this machine is {have}",
            fix=f"build a bundle for this machine: {how}")


# The shipped target profiles (data beside pcbedge.targets, read here without importing it:
# the profiles import the runtime's vocabulary, so the runtime cannot import them).
TARGETS_DIR = Path(__file__).resolve().parents[1] / "targets"


def shipped_targets_for(arch: str) -> list[str]:
    """Names of the shipped target profiles whose ``arch`` is ``arch``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 has the same parser as the tomli backport
        import tomli as tomllib
    names = []
    for path in sorted(TARGETS_DIR.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if isinstance(data.get("arch"), str) and \
                normalize_arch(data["arch"]) == normalize_arch(arch):
            names.append(path.stem)
    return names
