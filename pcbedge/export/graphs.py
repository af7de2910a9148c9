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


class ModelHandle:
    """The loaded checkpoint, handed to a family's parity check that releases it between its
    PyTorch and ONNX Runtime phases (``RELEASES_MODEL`` in its ``parity`` module): ``take()``
    returns the model once and keeps no reference, so the caller's ``del`` frees its weights;
    a later ``take()`` loads it again with ``load``."""

    def __init__(self, model, load):
        self._model, self._load = model, load

    def take(self):
        model, self._model = self._model, None
        return model if model is not None else self._load()
