"""``[hardware]`` of a target profile: the device's figures that ``pcbedge plan`` predicts from.

Peak dense rates per compute precision, memory bandwidth and size (each from a public source or
measured, named in ``source``), and the efficiency factors that turn a roofline floor into a
latency (calibrated, never assumed: ``calibration`` says from which measured or published
runs). docs/plan.md describes the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# compute precisions a rate may be given for; "int4" is weight-only 4-bit (MatMulNBits), whose
# rate is the kernel's (it dequantizes to fp16/fp32 or computes in int8)
RATE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
FLOAT_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class HardwareConfig:
    device: str
    peak_tops: dict                 # precision -> dense tera-ops/s (1 MAC = 2 ops)
    memory_bandwidth_gbs: float     # DRAM bandwidth, GB/s (1e9 bytes)
    memory_gb: float                # DRAM size (GiB), shared by CPU and accelerator on an SoC
    source: str                     # where the figures come from (datasheet, measurement)
    calibration: str                # which runs the efficiency factors were fitted on
    efficiency_compute: float = 0.5     # achieved / peak rate on the model's GEMMs and convs
    # the same for the GEMMs and convs of one precision whose kernels run nearer their measured
    # rate (a CPU's 4-bit MatMulNBits): precision -> factor; matrix-vector products keep
    # efficiency_compute (they have their own measured gemv_tops)
    efficiency_compute_by_precision: dict = field(default_factory=dict)
    efficiency_memory: float = 0.7      # achieved / peak bandwidth when streaming weights
    node_overhead_us: float = 0.0       # per node run (dispatch, launch), microseconds
    cache_mb: float = 0.0               # last-level cache: what fits there moves no DRAM bytes
    cache_bandwidth_gbs: float = 0.0    # passes over in-cache tensors (CPU); 0: fused, free
    host_ns_per_value: float = 0.0      # host-side preprocessing, ns per float value it writes
    #                                     into the vision graph's inputs
    memory_reserved_gb: float = 0.0     # taken by the OS and other processes
    runtime_overhead_mb: float = 0.0    # the runtime itself (interpreter, libraries, context)
    fallback: dict = field(default_factory=dict)   # precision -> the precision whose rate it
    #                                                 uses when it has none of its own
    # matrix-vector products (a decoded token's MatMuls): their own measured rates where the
    # kernels differ from the GEMM ones (a CPU's 4-bit GEMV dequantizes every weight per token)
    gemv_tops: dict = field(default_factory=dict)
    # what a float32 graph computes and stores its tensors in on this runtime: "fp16" where the
    # engine builder lowers it (TensorRT's fp16 flag, the jetson profiles' float decoder)
    float_precision: str = "fp32"
    # an engine that fuses element-wise ops into its GEMM / conv kernels and attention into one
    # kernel (TensorRT): only weight GEMM and conv outputs reach memory (docs/plan.md)
    fused_engine: bool = False

    def efficiency(self, precision: str) -> float:
        """The compute efficiency of MACs keyed ``precision`` ("int4", "int4:gemv")."""
        base, _, gemv = precision.partition(":")
        return (self.efficiency_compute if gemv
                else self.efficiency_compute_by_precision.get(base, self.efficiency_compute))

    def rate(self, precision: str) -> tuple[float, str]:
        """(MACs per second, the rate used) for ``precision`` ("int8", or "int4:gemv" for a
        matrix-vector product, which takes ``gemv_tops`` when given, else the GEMM rate)."""
        base, _, gemv = precision.partition(":")
        if gemv and base in self.gemv_tops:
            return self.gemv_tops[base] * 1e12 / 2, f"{base} gemv"
        seen = base
        while seen not in self.peak_tops:
            nxt = self.fallback.get(seen) or {"int4": "fp16", "fp16": "fp32",
                                              "int8": "fp32"}.get(seen)
            if nxt is None or nxt == seen:
                raise KeyError(base)
            seen = nxt
        return self.peak_tops[seen] * 1e12 / 2, seen


def _rates(v: Any) -> dict:
    if not isinstance(v, dict) or not v or "fp32" not in v and "fp16" not in v:
        raise ValueError("a table of precision = dense TOPS, with fp32 or fp16 "
                         f"(precisions: {', '.join(RATE_PRECISIONS)})")
    out = {}
    for k, x in v.items():
        if k not in RATE_PRECISIONS or isinstance(x, bool) or not isinstance(x, (int, float)) \
                or not x > 0:
            raise ValueError(f"precisions among {', '.join(RATE_PRECISIONS)}, each a number > 0")
        out[k] = float(x)
    return out


def _efficiencies(v: Any) -> dict:
    if not isinstance(v, dict) or not all(
            k in RATE_PRECISIONS and not isinstance(x, bool) and isinstance(x, (int, float))
            and 0 < x <= 1 for k, x in v.items()):
        raise ValueError(f"a table of precision = factor in (0, 1] "
                         f"(precisions: {', '.join(RATE_PRECISIONS)})")
    return {k: float(x) for k, x in v.items()}


def _gemv_rates(v: Any) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"a table of precision = dense TOPS ({', '.join(RATE_PRECISIONS)})")
    return {k: x for k, x in _rates({"fp32": 1.0, **v}).items() if k in v}


def _fallback(v: Any) -> dict:
    if not isinstance(v, dict) or not all(k in RATE_PRECISIONS and x in RATE_PRECISIONS
                                          for k, x in v.items()):
        raise ValueError(f"a table of precision = precision ({', '.join(RATE_PRECISIONS)})")
    return dict(v)


def hardware_spec(text, number, flag, choice, required) -> dict:
    """The field spec (validator, default) of [hardware], in profile.py's vocabulary (its
    validators are passed in)."""
    return {
        "device": (text, required),
        "peak_tops": (_rates, required),
        "memory_bandwidth_gbs": (number(0, lo_open=True), required),
        "memory_gb": (number(0, lo_open=True), required),
        "source": (text, required),
        "calibration": (text, required),
        "efficiency_compute": (number(0, 1.0, lo_open=True), 0.5),
        "efficiency_compute_by_precision": (_efficiencies, {}),
        "efficiency_memory": (number(0, 1.0, lo_open=True), 0.7),
        "node_overhead_us": (number(0, 1e4), 0.0),
        "cache_mb": (number(0, 1e5), 0.0),
        "cache_bandwidth_gbs": (number(0, 1e6), 0.0),
        "host_ns_per_value": (number(0, 1e6), 0.0),
        "memory_reserved_gb": (number(0), 0.0),
        "runtime_overhead_mb": (number(0), 0.0),
        "fallback": (_fallback, {}),
        "gemv_tops": (_gemv_rates, {}),
        "float_precision": (choice(*FLOAT_PRECISIONS), "fp32"),
        "fused_engine": (flag, False),
    }
