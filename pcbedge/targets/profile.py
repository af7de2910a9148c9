"""Target profiles: one TOML file per deployment target, loaded into frozen dataclasses.

A target is data, not a code branch: the build, the runtimes and the benchmark read these fields
and never test a target's name. Every field is validated here, once; a bad field raises
:class:`~pcbedge.errors.TargetError` naming the file, the field, the bad value and the valid
values. Unknown keys are refused, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from pcbedge.errors import TargetError
from pcbedge.runtime.pruning import METHODS as PRUNING_METHOD_NAMES
from pcbedge.runtime.pruning import TokenPruningConfig
from pcbedge.runtime.vocabulary import ARCHS, DEFAULT_SPIN_WAIT, SPIN_WAITS
from pcbedge.targets.hardware import HardwareConfig, hardware_spec

RUNTIMES = ("onnxruntime", "tensorrt")
# int4: weight-only 4-bit (onnxruntime MatMulNBits), for decoders (pcbedge.recipes.configs)
PRECISIONS = ("fp32", "fp16", "int8", "int4")
DECODER_METHODS = ("static", "dynamic")
SCHEMES = ("qdq_static", "none")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
PRUNING_METHODS = PRUNING_METHOD_NAMES   # the runtime's: one pruning vocabulary
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
             "XnnpackExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
             "DmlExecutionProvider", "QNNExecutionProvider")
# Op types onnxruntime's static quantizer can wrap in Q/DQ (onnxruntime.quantization.registry,
# QDQRegistry | QLinearOpsRegistry); written out so loading a profile does not import onnx.
QUANTIZABLE_OPS = ("Add", "ArgMax", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv",
                   "ConvTranspose", "CumSum", "EmbedLayerNormalization", "Flatten", "Gather",
                   "GatherElements", "Gemm", "GlobalAveragePool", "InstanceNormalization",
                   "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Relu",
                   "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "TopK",
                   "Transpose", "Unsqueeze", "Where")
MIN_INPUT_SIZE = 28   # families check their own multiple at build time (manifest size_multiple)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
BUSY_MACHINE_ACTIONS = ("flag", "refuse")  # what bench does on a busy machine (docs/bench.md)


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric precision of each graph group: "fp32", "fp16", "int8" or "int4" (decoder)."""

    vision: str
    decoder: str


@dataclass(frozen=True)
class QuantizationSettings:
    """The profile's [quantization] section as written: op lists, calibration, the INT8 decoder
    method, the 4-bit block size. Not a recipe itself: :func:`pcbedge.recipes.configs.
    config_for_group` turns it, with [precision], into the one recipe vocabulary's configs."""

    scheme: str
    vision_ops: tuple[str, ...]
    decoder_ops: tuple[str, ...]
    per_channel: bool
    calibration_method: str
    calibration_boards: int
    score_bias_boards: int = 0
    decoder_method: str = "static"    # int8 decoder: "static" (Q/DQ, calibrated) or "dynamic"
    block_size: int = 32              # int4: weights per scale
    int4_compute: str = "float"       # int4 on onnxruntime: "float" or "int8" activations
    int4_head: bool = True            # int4: the output projection (vocabulary head) too
    reduce_range: bool = False        # static int8: 7-bit weights (no u8s8 saturation)
    weight_type: str = "int8"         # static int8 on onnxruntime: "int8" (u8s8) or "uint8" (u8u8)


@dataclass(frozen=True)
class ShapeConfig:
    """Static shapes the graphs and engines are built for."""

    input_size: int
    batch: int
    max_text_len: int


@dataclass(frozen=True)
class TensorRTConfig:
    """TensorRT engine build settings (only for runtime = "tensorrt")."""

    version: str
    workspace_mb: int
    builder_optimization_level: int


@dataclass(frozen=True)
class GateConfig:
    """Benchmark gates: a bundle passes only if every one holds."""

    p95_ms_max: float
    max_map_drop: float
    max_count_drop: float
    max_hallucination_rise: float
    min_map: float
    max_question_drop: float = 0.02


@dataclass(frozen=True)
class BenchConfig:
    """How ``pcbedge bench`` treats a busy machine: flag the run, or refuse to time it."""

    busy_machine: str = "flag"
    max_other_cpu_pct: float = 20.0
    max_other_runnable_per_cpu: float = 0.25


@dataclass(frozen=True)
class SecurityConfig:
    """``[security]``: ``require_signature`` makes ``pcbedge build`` refuse to build without
    ``--sign`` and the bundle refuse to run where no trusted key is set (``--verify`` or
    ``PCBEDGE_VERIFY_KEY``; pcbedge.bundle.signing)."""

    require_signature: bool = False


@dataclass(frozen=True)
class TargetProfile:
    """One deployment target, as written in ``pcbedge/targets/<name>.toml``."""

    name: str
    description: str
    arch: str
    runtime: str
    providers: tuple[str, ...]
    threads: int | None
    precision: PrecisionConfig
    quantization: QuantizationSettings
    pruning: TokenPruningConfig
    shapes: ShapeConfig
    tensorrt: TensorRTConfig | None
    latency_budget_ms: float
    gates: GateConfig
    spin_wait: str = DEFAULT_SPIN_WAIT
    bench: BenchConfig = BenchConfig()
    security: SecurityConfig = SecurityConfig()
    hardware: HardwareConfig | None = None   # the device's figures, for pcbedge plan
    source: str = ""  # the file it was loaded from, for messages and manifests
    # [family.<key>] tables: per model family, sections that replace fields of the base profile
    family_overrides: dict = field(default_factory=dict, compare=False)
    family: str = ""  # the family key whose overrides are applied ("" = the base profile)

    def as_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists), for manifests and reports."""
        d = asdict(self)
        d.pop("family_overrides")
        return d

    def for_family(self, key: str) -> "TargetProfile":
        """This profile with the ``[family.<key>]`` overrides applied (validated like the rest);
        itself when the profile has none for ``key``."""
        over = self.family_overrides.get(key)
        if not over:
            return self
        data = copy.deepcopy(self._raw)
        for sec, table in over.items():
            data.setdefault(sec, {}).update(table)
        data.pop("family", None)
        p = parse_profile(data, f"{self.source} [family.{key}]")
        object.__setattr__(p, "family", key)
        object.__setattr__(p, "source", self.source)
        return p


# --- field validators: each returns the parsed value or raises ValueError(valid values) -----

def _choice(*valid: str) -> Callable[[Any], str]:
    def check(v):
        if not isinstance(v, str) or v not in valid:
            raise ValueError("one of " + ", ".join(repr(x) for x in valid))
        return v
    return check


def _text(v):
    if not isinstance(v, str) or not v.strip():
        raise ValueError("a non-empty string")
    return v


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return v
    return check


def _number(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v):
        ok = not isinstance(v, bool) and isinstance(v, (int, float))
        ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
        if not ok:
            rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"a number {rng}")
        return float(v)
    return check


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _list_of(valid: tuple[str, ...]) -> Callable[[Any], tuple]:
    def check(v):
        bad_item = any(not isinstance(x, str) or x not in valid for x in v) \
            if isinstance(v, list) else True
        if bad_item or len(set(v)) != len(v):
            raise ValueError("a list without repeats of " + ", ".join(repr(x) for x in valid))
        return tuple(v)
    return check


def _version(v):
    if not isinstance(v, str) or not re.fullmatch(r"\d+\.\d+(\.\d+)*", v):
        raise ValueError('a version string such as "10.3"')
    return v


# --- sections: field name -> (validator, default or REQUIRED) ---------------------------------

REQUIRED = object()

TOP_FIELDS = {
    "name": (_text, REQUIRED),
    "description": (_text, REQUIRED),
    "arch": (_choice(*ARCHS), REQUIRED),
    "runtime": (_choice(*RUNTIMES), REQUIRED),
    "providers": (_list_of(PROVIDERS), ()),
    "threads": (_int(1, 256), None),
    "spin_wait": (_choice(*SPIN_WAITS), DEFAULT_SPIN_WAIT),
    "latency_budget_ms": (_number(0, lo_open=True), REQUIRED),
}
SECTIONS: dict[str, tuple[type, dict]] = {
    "precision": (PrecisionConfig, {
        "vision": (_choice(*PRECISIONS), REQUIRED),
        "decoder": (_choice(*PRECISIONS), REQUIRED)}),
    "quantization": (QuantizationSettings, {
        "scheme": (_choice(*SCHEMES), REQUIRED),
        "vision_ops": (_list_of(QUANTIZABLE_OPS), ()),
        "decoder_ops": (_list_of(QUANTIZABLE_OPS), ()),
        "per_channel": (_bool, True),
        "calibration_method": (_choice(*CALIBRATION_METHODS), "minmax"),
        "calibration_boards": (_int(1), 16),
        "score_bias_boards": (_int(0, 4096), 0),
        "decoder_method": (_choice(*DECODER_METHODS), "static"),
        "block_size": (_int(16, 4096), 32),
        "int4_compute": (_choice("float", "int8"), "float"),
        "int4_head": (_bool, True),
        "reduce_range": (_bool, False),
        "weight_type": (_choice("int8", "uint8"), "int8")}),
    "pruning": (TokenPruningConfig, {
        "method": (_choice(*PRUNING_METHODS), REQUIRED),
        "keep_ratio": (_number(0.0, 1.0, lo_open=True), 1.0),
        "min_tokens": (_int(1, 1 << 20), 16)}),
    "shapes": (ShapeConfig, {
        "input_size": (_int(MIN_INPUT_SIZE, 4096), 640),
        "batch": (_int(1, 64), 1),
        "max_text_len": (_int(8, 4096), 96)}),
    "tensorrt": (TensorRTConfig, {
        "version": (_version, REQUIRED),
        "workspace_mb": (_int(64), REQUIRED),
        "builder_optimization_level": (_int(0, 5), 3)}),
    "gates": (GateConfig, {
        "p95_ms_max": (_number(0, lo_open=True), None),  # None: the latency budget
        "max_map_drop": (_number(0.0, 1.0), 0.01),
        "max_count_drop": (_number(0.0, 1.0), 0.01),
        "max_hallucination_rise": (_number(0.0, 1.0), 0.0),
        "min_map": (_number(0.0, 1.0), 0.90),
        "max_question_drop": (_number(0.0, 1.0), 0.02)}),
    "bench": (BenchConfig, {
        "busy_machine": (_choice(*BUSY_MACHINE_ACTIONS), "flag"),
        "max_other_cpu_pct": (_number(0.0, 100.0), 20.0),
        "max_other_runnable_per_cpu": (_number(0.0), 0.25)}),
    "security": (SecurityConfig, {
        "require_signature": (_bool, False)}),
    "hardware": (HardwareConfig, hardware_spec(_text, _number, _bool, _choice, REQUIRED)),
}
OPTIONAL_SECTIONS = ("tensorrt", "gates", "bench", "security", "hardware")
NONE_WHEN_ABSENT = ("tensorrt", "hardware")
# sections a [family.<key>] table may change (the hardware fields stay the target's)
OVERRIDABLE = ("precision", "quantization", "pruning", "shapes", "gates")


def _fail(src: str, field: str, value: Any, valid: str, fix: str | None = None) -> TargetError:
    return TargetError(f"target profile {src}: field '{field}' = {value!r} is not valid; "
                       f"expected {valid}", fix=fix or f"edit '{field}' in {src}")


def _refuse_unknown(src: str, prefix: str, data: dict, valid) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise TargetError(f"target profile {src}: unknown key '{prefix}{unknown[0]}'; valid keys "
                          f"in {where}: {', '.join(valid)}", fix="remove it or fix its spelling")


def _parse_fields(src: str, prefix: str, data: dict, spec: dict) -> dict:
    _refuse_unknown(src, prefix, data, spec)
    out = {}
    for key, (check, default) in spec.items():
        if key not in data:
            if default is REQUIRED:
                raise TargetError(f"target profile {src}: missing field '{prefix}{key}'",
                                  fix=f"add '{key}' to {src} (see docs/targets.md)")
            out[key] = default
            continue
        try:
            out[key] = check(data[key])
        except ValueError as e:
            raise _fail(src, prefix + key, data[key], str(e)) from None
    return out


def _check_consistency(src: str, p: TargetProfile) -> None:
    """Rules between fields, each a real constraint of the runtimes or the recipe."""
    for graph in ("vision", "decoder"):
        if (getattr(p.precision, graph) == "int4"
                and (graph == "vision" or p.runtime != "onnxruntime")):
            raise _fail(src, f"precision.{graph}", "int4",
                        "'int4' only for the decoder on onnxruntime (weight-only MatMulNBits, a "
                        "contrib op TensorRT does not parse; convolutions have no 4-bit kernels)")
    if p.runtime == "onnxruntime":
        if not p.providers or p.providers[-1] != "CPUExecutionProvider":
            raise _fail(src, "providers", list(p.providers),
                        "a list ending with 'CPUExecutionProvider' (onnxruntime runs the ops an "
                        "accelerator lacks on the CPU provider)")
        cpu_only = p.providers == ("CPUExecutionProvider",)
        for graph in ("vision", "decoder"):
            if cpu_only and getattr(p.precision, graph) == "fp16":
                raise _fail(src, f"precision.{graph}", "fp16",
                            "'fp32' or 'int8' on the CPU provider (it lacks fp16 kernels for most "
                            "ops and would run Cast-wrapped fp32)")
    if p.runtime == "tensorrt":
        if p.providers:
            raise _fail(src, "providers", list(p.providers),
                        "[] for runtime 'tensorrt' (providers are an onnxruntime setting)")
        if p.tensorrt is None:
            raise TargetError(f"target profile {src}: runtime 'tensorrt' needs a [tensorrt] "
                              "section", fix="add [tensorrt] with version and workspace_mb")
    elif p.tensorrt is not None:
        raise TargetError(f"target profile {src}: a [tensorrt] section with runtime "
                          f"{p.runtime!r}", fix="remove [tensorrt] or set runtime = \"tensorrt\"")
    q = p.quantization
    for graph in ("vision", "decoder"):
        ops = getattr(q, f"{graph}_ops")
        int8 = getattr(p.precision, graph) == "int8"
        dynamic = graph == "decoder" and q.decoder_method == "dynamic"
        if int8 and q.scheme == "none" and not dynamic:
            raise _fail(src, "quantization.scheme", q.scheme,
                        f"'qdq_static', since precision.{graph} is 'int8'")
        if int8 and not ops and not dynamic:
            raise _fail(src, f"quantization.{graph}_ops", [],
                        f"a non-empty op list, since precision.{graph} is 'int8'")
        if not int8 and ops:
            precision = getattr(p.precision, graph)
            raise _fail(src, f"quantization.{graph}_ops", list(ops),
                        f"[] since precision.{graph} is {precision!r}, not 'int8'")
    if q.score_bias_boards and not (p.precision.vision == "int8" and p.runtime == "onnxruntime"):
        raise _fail(src, "quantization.score_bias_boards", q.score_bias_boards,
                    "0 unless the vision graph is int8 on onnxruntime (the correction is "
                    "measured with onnxruntime's kernels)")
    if q.scheme == "qdq_static" and not (q.vision_ops or q.decoder_ops):
        raise _fail(src, "quantization.scheme", q.scheme,
                    "'none' when no graph is int8")
    if p.pruning.method == "none" and p.pruning.keep_ratio != 1.0:
        raise _fail(src, "pruning.keep_ratio", p.pruning.keep_ratio,
                    "1.0 with method 'none'")
    if q.block_size & (q.block_size - 1):
        raise _fail(src, "quantization.block_size", q.block_size, "a power of two (32, 64, 128)")
    if q.weight_type != "int8" and p.runtime != "onnxruntime":
        raise _fail(src, "quantization.weight_type", q.weight_type,
                    "'int8' for TensorRT (its explicit quantization takes symmetric int8)")
    if q.reduce_range and p.runtime != "onnxruntime":
        raise _fail(src, "quantization.reduce_range", True,
                    "false for TensorRT (its int8 kernels do not saturate; 7-bit weights only "
                    "lose precision there)")
    hw = p.hardware
    if hw is not None and hw.memory_reserved_gb >= hw.memory_gb:
        raise _fail(src, "hardware.memory_reserved_gb", hw.memory_reserved_gb,
                    f"less than hardware.memory_gb ({hw.memory_gb})")
    if q.decoder_method == "dynamic" and p.runtime != "onnxruntime":
        raise _fail(src, "quantization.decoder_method", "dynamic",
                    "'static' for TensorRT (explicit quantization needs Q/DQ scales)")


def parse_profile(data: dict, src: str = "<profile>", *, stem: str | None = None) -> TargetProfile:
    """Validate a parsed TOML table into a :class:`TargetProfile`. ``stem``: the file name the
    profile's ``name`` must equal."""
    _refuse_unknown(src, "", data, [*TOP_FIELDS, *SECTIONS, "family"])
    overrides = _family_overrides(src, data.get("family", {}))
    top = _parse_fields(src, "", {k: v for k, v in data.items() if k in TOP_FIELDS}, TOP_FIELDS)
    if not NAME_RE.match(top["name"]):
        raise _fail(src, "name", top["name"], "lower-case letters, digits, '.', '_' or '-'")
    if stem is not None and top["name"] != stem:
        raise _fail(src, "name", top["name"], f"{stem!r}, the file's name",
                    fix="rename the file or the profile so both match")
    sections: dict[str, Any] = {}
    for sec, (cls, spec) in SECTIONS.items():
        table = data.get(sec)
        if table is None:
            if sec not in OPTIONAL_SECTIONS:
                raise TargetError(f"target profile {src}: missing section [{sec}]",
                                  fix=f"add [{sec}] (see docs/targets.md)")
            if sec in NONE_WHEN_ABSENT:
                sections[sec] = None
                continue
            table = {}
        if not isinstance(table, dict):
            raise _fail(src, sec, table, f"a [{sec}] table")
        values = _parse_fields(src, f"{sec}.", table, spec)
        if sec == "gates" and values["p95_ms_max"] is None:
            values["p95_ms_max"] = top["latency_budget_ms"]
        sections[sec] = cls(**values)
    profile = TargetProfile(**top, **sections, source=src, family_overrides=overrides)
    _check_consistency(src, profile)
    object.__setattr__(profile, "_raw", copy.deepcopy(data))
    for key in overrides:      # every override must give a valid profile, checked at load
        profile.for_family(key)
    return profile


def _family_overrides(src: str, table) -> dict:
    """``[family.<key>.<section>]`` tables: which sections a model family changes. Keys are
    family profile keys (pcbedge.families: ``Family.profile_key``); data, never code branches."""
    if not isinstance(table, dict):
        raise _fail(src, "family", table, "a table of [family.<key>.<section>] tables")
    out = {}
    for key, sections in table.items():
        if not isinstance(sections, dict) or not NAME_RE.match(key.replace("_", "-")):
            raise _fail(src, f"family.{key}", sections, "a table of sections")
        _refuse_unknown(src, f"family.{key}.", sections, OVERRIDABLE)
        for sec, values in sections.items():
            if not isinstance(values, dict):
                raise _fail(src, f"family.{key}.{sec}", values, f"a [family.{key}.{sec}] table")
            _refuse_unknown(src, f"family.{key}.{sec}.", values, SECTIONS[sec][1])
        out[key] = copy.deepcopy(sections)
    return out
