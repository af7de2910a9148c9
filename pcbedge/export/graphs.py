"""What a family hands the exporter for one graph: the module, example inputs, the I/O contract.

Torch-free data classes (the module and example tensors are opaque here), shared by every
family's ``export.py`` and by :mod:`pcbedge.export.exporter`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: an ``str`` axis is dynamic (its name), an ``int`` is fixed."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphExport:
    """One graph to export. ``dynamic_shapes`` is the torch.export form (dynamo exporter); the
    legacy exporter's ``dynamic_axes`` are derived from the ``str`` axes of the specs."""

    name: str
    file: str
    module: Any
    args: tuple
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_shapes: dict = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)}
                for t in (*self.inputs, *self.outputs)
                if any(isinstance(a, str) for a in t.shape)}
