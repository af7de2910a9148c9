"""The manifest's schema: every core field's type and range, checked before anything runs.

A compact declarative validator, so the device needs no jsonschema: a spec is a tree of
:class:`Int`, :class:`Num`, :class:`Str`, :class:`Bool`, :class:`List`, :class:`Map`,
:class:`Obj` and :class:`OneOf` nodes, and :func:`validate` walks a value against it. A
violation names the field's JSON path (``runtime.threads``, ``graphs.vision.inputs[0].name``),
the bad value and what is valid. The core spec (:data:`MANIFEST`) holds the fields every
family's manifest has; a family declares its own extras in its ``schema`` role module
(``MANIFEST``, a ``{field: Spec}`` table over the same nodes, and ``RULES``; e.g.
pcbedge/families/<name>/schema.py) and the runtime checks them when it opens the bundle. Rules between fields (the input size is a multiple of the stride, a built bundle names
its CPU architecture, ...) are :data:`RULES`. Torch- and onnxruntime-free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

MIN_INPUT_SIZE = 16       # pixels of the square model input; a family's stride may need more
MAX_INPUT_SIZE = 4096     # 4096^2 float32 x 3 channels is 200 MB: past that a board hangs
MAX_TEXT_LEN = 1 << 20    # the position tables of the largest decoders we export (128k) fit
MAX_THREADS = 256         # onnxruntime thread pools past this are a typo, not a machine
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16")   # pcbedge export --precision (export/precision.py)
ENGINES = ("onnxruntime", "tensorrt")
BUILT_KEYS = ("target", "build", "reference", "quantization", "calibration")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"


class Violation(Exception):
    """A value that breaks the schema: ``path`` (JSON path), ``value``, ``expected``; or, with
    ``problem`` set, a missing or unknown field."""

    def __init__(self, path: str, value: Any, expected: str, problem: str = "value"):
        self.path, self.value, self.expected, self.problem = path, value, expected, problem
        super().__init__(f"{path}: {expected}")


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Spec:
    """A node of a spec tree. ``nullable``: ``null`` is also valid."""

    nullable: bool = False

    def describe(self) -> str:
        raise NotImplementedError

    def expected(self) -> str:
        return self.describe() + (" or null" if self.nullable else "")

    def check(self, value, path: str) -> None:
        if value is None and self.nullable:
            return
        self._check(value, path)

    def _check(self, value, path: str) -> None:
        raise NotImplementedError

    def fail(self, value, path: str, why: str = "") -> Violation:
        return Violation(path, value, self.expected() + (f" ({why})" if why else ""))


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int
    nullable: bool = False

    def describe(self) -> str:
        return f"an integer from {self.lo} to {self.hi}"

    def _check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise self.fail(value, path)


@dataclass(frozen=True)
class Num(Spec):
    lo: float
    hi: float
    lo_open: bool = False
    nullable: bool = False

    def describe(self) -> str:
        return f"a number {'>' if self.lo_open else '>='} {self.lo:g} and <= {self.hi:g}"

    def _check(self, value, path):
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if not (ok and (value > self.lo if self.lo_open else value >= self.lo)
                and value <= self.hi):
            raise self.fail(value, path)


@dataclass(frozen=True)
class Str(Spec):
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    max_len: int = 256
    nullable: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return f"a non-empty string of at most {self.max_len} characters" + (
            f" matching {self.pattern}" if self.pattern else "")

    def _check(self, value, path):
        if (not isinstance(value, str) or not value or len(value) > self.max_len
                or (self.choices and value not in self.choices)
                or (self.pattern and not re.fullmatch(self.pattern, value))):
            raise self.fail(value, path)


@dataclass(frozen=True)
class Bool(Spec):
    nullable: bool = False

    def describe(self) -> str:
        return "true or false"

    def _check(self, value, path):
        if not isinstance(value, bool):
            raise self.fail(value, path)


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    min_len: int = 0
    max_len: int = 1 << 16
    nullable: bool = False

    def describe(self) -> str:
        return f"a list of {self.min_len} to {self.max_len} items"

    def _check(self, value, path):
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            raise self.fail(value, path)
        for i, v in enumerate(value):
            self.item.check(v, _join(path, i))


@dataclass(frozen=True)
class Map(Spec):
    """An object whose keys are names (``key``) and whose values all follow ``value``."""

    value: Spec
    key: Str = Str(pattern=_NAME, max_len=128)
    min_len: int = 0
    max_len: int = 1 << 16
    nullable: bool = False

    def describe(self) -> str:
        return f"an object of {self.min_len} to {self.max_len} entries"

    def _check(self, value, path):
        if not isinstance(value, dict) or not self.min_len <= len(value) <= self.max_len:
            raise self.fail(value, path)
        for k, v in value.items():
            try:
                self.key.check(k, _join(path, k))
            except Violation as e:
                raise Violation(e.path, k, f"a key that is {self.key.expected()}",
                                "key") from None
            self.value.check(v, _join(path, k))


@dataclass(frozen=True)
class Obj(Spec):
    """An object with known ``fields``; ``required`` must be present; ``extra``: other keys are
    allowed (a family's or a newer tool's additions) or refused (where a typo would silently
    fall back to a default)."""

    fields: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    extra: bool = True
    nullable: bool = False

    def describe(self) -> str:
        return "an object" + (f" with {', '.join(self.required)}" if self.required else "")

    def _check(self, value, path):
        if not isinstance(value, dict):
            raise self.fail(value, path)
        for key in self.required:
            if key not in value:
                raise Violation(_join(path, key), None, self.fields[key].expected(), "missing")
        if not self.extra:
            unknown = sorted(str(k) for k in set(value) - set(self.fields))
            if unknown:
                raise Violation(_join(path, unknown[0]), value[unknown[0]],
                                "one of the fields " + ", ".join(self.fields), "unknown")
        for key, spec in self.fields.items():
            if key in value:
                spec.check(value[key], _join(path, key))


@dataclass(frozen=True)
class OneOf(Spec):
    options: tuple[Spec, ...]
    nullable: bool = False

    def describe(self) -> str:
        return " or ".join(o.expected() for o in self.options)

    def _check(self, value, path):
        for option in self.options:
            try:
                option.check(value, path)
                return
            except Violation:
                continue
        raise self.fail(value, path)


def validate(value: dict, spec: dict[str, Spec], path: str = "") -> None:
    """Check the fields of ``value`` named in ``spec`` (a ``{field: Spec}`` table; fields not in
    ``value`` are skipped: required ones are listed by the caller). Raises :class:`Violation`."""
    for key, sub in spec.items():
        if key in value:
            sub.check(value[key], _join(path, key))


# --- the core manifest --------------------------------------------------------------------

NAME = Str(pattern=_NAME, max_len=128)
REL_PATH = Str(max_len=1024)     # pcbedge.bundle.manifest.safe_path checks where it points
DIM = OneOf((Int(0, 1 << 31), Str(max_len=256)), nullable=True)   # fixed, symbolic or unknown
TENSOR = Obj({"name": Str(max_len=512), "dtype": Str(max_len=32),
              "shape": List(DIM, 0, 16, nullable=True)}, required=("name",))
GRAPH = Obj({"file": REL_PATH, "inputs": List(TENSOR, 1, 256), "outputs": List(TENSOR, 1, 256),
             "precision": Str(PRECISIONS)}, required=("file", "inputs", "outputs"))
THREADS = Int(1, MAX_THREADS, nullable=True)
SHA256 = Str(pattern="[0-9a-f]{64}", max_len=64)
ANY_OBJECT = Obj(nullable=True)

MANIFEST: dict[str, Spec] = {
    "kind": Str(("pcbedge-bundle",)),
    "family": NAME,
    "created_utc": Str(max_len=64),
    "graphs": Map(GRAPH, min_len=1, max_len=64),
    "graph_groups": Map(List(NAME, 1, 64), key=Str(("vision", "decoder")), nullable=True),
    "kv_cache": Obj({"num_layers": Int(1, 1024), "num_heads": Int(1, 1024),
                     "head_dim": Int(1, 8192), "max_positions": Int(1, MAX_TEXT_LEN)},
                    nullable=True),
    "visual_tokens": Int(1, 1 << 20),
    "visual_token_stride": Int(1, 1024),
    "size_multiple": Int(1, 1024),
    "token_scores": Map(Str(max_len=512), max_len=64),
    "num_regions": Int(0, 65536),
    "input_size": Int(MIN_INPUT_SIZE, MAX_INPUT_SIZE),
    "preprocess": Obj(),
    "tokenizer": REL_PATH,
    "max_question_tokens": Int(1, 65536),
    "max_text_len": Int(1, MAX_TEXT_LEN),
    "answer": Obj({"parser": NAME}, required=("parser",)),
    "assets": Map(REL_PATH, nullable=True),
    "precision": Obj({"vision": Str(PRECISIONS), "decoder": Str(PRECISIONS)},
                     required=("vision", "decoder"), extra=False),
    "export_precision": Str(EXPORT_PRECISIONS),
    "pruning": Obj({"method": NAME, "keep_ratio": Num(0.0, 1.0, lo_open=True),
                    "min_tokens": Int(1, 1 << 20)}, required=("method",), extra=False,
                   nullable=True),
    "runtime": Obj({"engine": Str(ENGINES), "providers": List(NAME, 0, 16),
                    "threads": THREADS, "inter_op_threads": THREADS,
                    "graph_optimization_level": Str(max_len=64),
                    "execution_mode": Str(max_len=64), "spin_wait": Str(max_len=64),
                    "engines": OneOf((Str(max_len=64), Obj()), nullable=True)},
                   required=("engine",), extra=False),
    "tools": Map(Str(max_len=128, nullable=True), max_len=64),
    "source_model": Obj(),
    "files": Map(Obj({"sha256": SHA256, "bytes": Int(0, 1 << 50)},
                     required=("sha256", "bytes"), extra=False),
                 key=REL_PATH, min_len=1, max_len=100_000),
    "target": Obj({"name": NAME, "arch": Str(pattern=_NAME, max_len=32),
                   "runtime": Str(ENGINES), "threads": THREADS,
                   "security": Obj({"require_signature": Bool()}, extra=False)},
                  required=("name", "arch")),
    **{k: ANY_OBJECT for k in ("build", "reference", "quantization", "calibration", "parity",
                               "exporter", "vocab", "tensorrt", "trt_validation",
                               "export_peak_rss_mb")},
}


# --- rules between fields -----------------------------------------------------------------

def _input_multiple(m: dict) -> None:
    step = m.get("size_multiple") or m.get("visual_token_stride")
    if step and m["input_size"] % step:
        lo = -(-MIN_INPUT_SIZE // step) * step
        raise Violation("input_size", m["input_size"],
                        f"a multiple of {step} (size_multiple) from {max(lo, step)} to "
                        f"{MAX_INPUT_SIZE // step * step}")


def _text_fits(m: dict) -> None:
    if m["max_text_len"] < m["max_question_tokens"]:
        raise Violation("max_text_len", m["max_text_len"],
                        f"at least max_question_tokens ({m['max_question_tokens']})")
    positions = (m.get("kv_cache") or {}).get("max_positions")
    if positions is not None and m["max_text_len"] > positions:
        raise Violation("max_text_len", m["max_text_len"],
                        f"at most kv_cache.max_positions ({positions})")


def _groups_name_graphs(m: dict) -> None:
    for group, roles in (m.get("graph_groups") or {}).items():
        for i, role in enumerate(roles):
            if role not in m["graphs"]:
                raise Violation(f"graph_groups.{group}[{i}]", role,
                                f"a graph role of this bundle ({', '.join(m['graphs'])})")


def is_built(m: dict) -> bool:
    """A bundle built for a target (by ``pcbedge build``), not a portable float export (whose
    graphs are all of its ``export_precision``, fp32 when absent)."""
    precision = m.get("precision") or {}
    floats = m.get("export_precision") or "fp32"
    return any(k in m for k in BUILT_KEYS) or any(v != floats for v in precision.values())


def _built_names_its_target(m: dict) -> None:
    """A built bundle runs only on its target's CPU architecture: it must say which."""
    if is_built(m) and not isinstance(m.get("target"), dict):
        raise Violation("target", m.get("target"),
                        "an object naming the target and its arch (this bundle was built for a "
                        "target: it has a build record or graphs not of its export "
                        "precision)", "missing")


RULES: tuple[Callable[[dict], None], ...] = (_input_multiple, _text_fits, _groups_name_graphs,
                                             _built_names_its_target)


def validate_manifest(m: dict, extra: dict[str, Spec] | None = None) -> None:
    """The core fields of ``m`` (and ``extra``, a family's ``{field: Spec}`` table), then the
    rules between fields. Raises :class:`Violation`; required fields are checked before."""
    validate(m, MANIFEST)
    if extra:
        validate(m, extra)
    for rule in RULES:
        rule(m)
