"""Whether this CPU's INT8 kernels compute a bundle's static INT8 graphs exactly.

onnxruntime's x86 u8 x s8 kernels without VNNI (AVX2, AVX-512F/BW) multiply with
``vpmaddubsw``, which adds pairs of u8 x s8 products into a *saturating* int16: with full 8-bit
weights (|w| <= 127) two products of a large activation reach 2 x 255 x 127 = 64,770 > 32,767 and
clip. VNNI (``vpdpbusd``) and the ARM64 kernels accumulate in int32 and never clip. A bundle
quantized with ``reduce_range`` (7-bit weights, |w| <= 64: 2 x 255 x 64 = 32,640) is exact on
every one of them. Measured on the reference model's vision tower on an AVX2-only x86 host:
visual-token error against FP32 0.30 (rel. L2) with 8-bit weights, 0.04-0.07 with 7-bit
(docs/build.md).
"""
from __future__ import annotations

import platform
from pathlib import Path

from pcbedge.runtime.vocabulary import normalize_arch

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8")


def x86_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """True/False from the kernel's CPU flags; None where they cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(f in flags for f in VNNI_FLAGS)
    return None


def saturating_graphs(manifest: dict) -> list[str]:
    """Graphs of ``manifest`` quantized u8 x s8 with full 8-bit weights (the ones whose sums clip
    on x86 kernels without VNNI)."""
    graphs = ((manifest.get("quantization") or {}).get("graphs") or {})
    out = []
    for name, g in graphs.items():
        c = (g or {}).get("config") or {}
        if (c.get("scheme") == "qdq_static" and c.get("activation_type") == "uint8"
                and c.get("weight_type") == "int8" and not c.get("reduce_range")):
            out.append(name)
    return sorted(out)


def saturation_warning(manifest: dict, machine: str | None = None,
                       cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """A sentence when this machine's onnxruntime INT8 kernels clip the bundle's sums, else
    None (ARM, VNNI x86, bundles with 7-bit weights or without static INT8, unknown CPUs)."""
    if (manifest.get("runtime") or {}).get("engine", "onnxruntime") != "onnxruntime":
        return None
    graphs = saturating_graphs(manifest)
    if not graphs or normalize_arch(machine or platform.machine()) != "x86_64":
        return None
    if x86_has_vnni(cpuinfo) is not False:
        return None
    return (f"this x86 CPU has no VNNI: onnxruntime's u8 x s8 kernels add products in a "
            f"saturating int16, and the 8-bit weights of {graphs} clip there, so answers drift "
            f"from what the build measured; rebuild with reduce_range = true in the target's "
            f"[quantization] (7-bit weights, exact on every CPU)")
