"""Export precision (``pcbedge export --precision``): the float type of the graphs' weights and
math. The graphs' inputs and outputs stay float32 whatever the precision, so runners, the
manifest's I/O contract and the bench do not change: each graph casts its float inputs on entry
and its float outputs on exit.

- ``fp32`` (default): what every target's build quantizes from.
- ``fp16``: half the files, and the checkpoint held in fp16 while its graphs are traced.
  onnxruntime's CPU provider runs fp16 graphs, so parity is checked as for fp32, against
  PyTorch in float32 on the same checkpoint, with fp16's tolerances. On an x86 CPU its sessions
  are not smaller: they keep a float32 copy of the weights beside the fp16 ones (measured on a
  2B model, docs/real-size.md). ``pcbedge build`` widens fp16 graphs back to float32 before it
  quantizes them or keeps a group float (:mod:`pcbedge.recipes.widen`).
- ``bf16``: the checkpoint's own type for most published VLMs; loaded and written in bf16 (half
  of fp32's memory and files). onnxruntime's CPU provider has no bf16 kernels (not even Mul), so
  such graphs cannot be parity-checked or built here: the export needs ``--no-check`` and says
  so, and ``build`` refuses them.

Torch is imported inside the functions (this module is imported by torch-free code).
"""
from __future__ import annotations

from pcbedge.bundle.schema import EXPORT_PRECISIONS as PRECISIONS   # what a manifest may say
from pcbedge.errors import ExportError

DEFAULT_PRECISION = "fp32"
# parity tolerances when the caller gives none: fp16 keeps 11 significant bits, and a deep
# graph's outputs carry a few of its roundings (measured on the tiny test models: max rel 2e-3)
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2), "bf16": (1e-1, 1e-1)}
DEFAULT_OPSET = 18
BF16_MIN_OPSET = 22   # ONNX's Conv takes bf16 from opset 22


def check_precision(precision, check: bool, family, opset: int | None) -> int:
    """``precision`` validated against what the family's graphs and this machine can export;
    returns the opset to export at (``opset``, else the default for the precision).
    ExportError naming the value and the fix otherwise."""
    if precision not in PRECISIONS:
        raise ExportError(f"export precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                          fix="use --precision fp32 (default), fp16 or bf16")
    if precision not in family.export_precisions:
        raise ExportError(f"the {family.name} family exports {', '.join(family.export_precisions)}"
                          f" graphs, not {precision}",
                          fix=f"export with --precision {family.export_precisions[0]}")
    if precision == "bf16" and opset is not None and opset < BF16_MIN_OPSET:
        raise ExportError(f"opset {opset} has no bf16 Conv (ONNX added it in opset "
                          f"{BF16_MIN_OPSET})", fix=f"use opset {BF16_MIN_OPSET} or later for bf16")
    if precision == "bf16" and check:
        raise ExportError("bf16 graphs cannot be parity-checked here: onnxruntime's CPU "
                          "provider has no bf16 kernels",
                          fix="export with --precision fp16 (checked, and buildable for every "
                              "target), or add --no-check to write unchecked bf16 graphs for a "
                              "runtime with bf16 kernels")
    if opset is not None:
        return opset
    return BF16_MIN_OPSET if precision == "bf16" else DEFAULT_OPSET


def torch_dtype(precision: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def at_precision(g, precision: str):
    """``g`` (a GraphExport) with its module run in ``precision`` behind float32 inputs and
    outputs; ``g`` itself for fp32. The module's parameters must already be in that type."""
    if precision == "fp32":
        return g
    import dataclasses

    import torch

    dtype = torch_dtype(precision)

    class CastAtBoundary(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            args = [a.to(dtype) if a.is_floating_point() else a for a in args]
            out = self.inner(*args)
            out = out if isinstance(out, tuple) else (out,)
            return tuple(o.float() if o.is_floating_point() else o for o in out)

    names = [t.name for t in g.inputs]
    # torch.export reads a *args forward's dynamic shapes as one tuple in argument order
    shapes = (tuple(g.dynamic_shapes.get(n) for n in names),) if g.dynamic_shapes else {}
    return dataclasses.replace(g, module=CastAtBoundary(g.module).eval(), dynamic_shapes=shapes)


def graph_precision(manifest: dict) -> str:
    """The float type of an export's graphs (``export_precision``; fp32 for exports made before
    the field existed)."""
    return manifest.get("export_precision") or DEFAULT_PRECISION
