"""Parity bookkeeping shared by every family's parity check: running max errors per graph and
output against PyTorch, and the first violations. An output passes where every element satisfies
``|onnx - torch| <= atol + rtol * |torch|`` (numpy's allclose); ``max_abs`` = max |onnx - torch|,
``max_rel`` = max |onnx - torch| / max(|torch|, atol)."""
from __future__ import annotations

import numpy as np

from pcbedge.errors import ExportError


def check_tolerances(atol, rtol) -> tuple[float, float]:
    for name, v in (("atol", atol), ("rtol", rtol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ExportError(f"parity tolerance {name}={v!r} is not a number >= 0",
                              fix="use e.g. atol=1e-3, rtol=1e-3")
    return float(atol), float(rtol)


class ParityErrors:
    """Running max errors per graph and output, and the first violation found."""

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.graphs: dict[str, dict[str, dict]] = {}
        self.failures: list[str] = []
        self.tie_reorders = 0

    def add(self, graph: str, name: str, got: np.ndarray, ref: np.ndarray, case: str) -> None:
        if got.shape != ref.shape:
            self.failures.append(f"{graph}.{name} at {case}: shape {got.shape} vs torch "
                                 f"{ref.shape}")
            return
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        mag = np.abs(ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(mag, max(self.atol, 1e-12))).max()) if diff.size else 0.0
        slot = self.graphs.setdefault(graph, {}).setdefault(name, {"max_abs": 0.0, "max_rel": 0.0})
        slot["max_abs"] = max(slot["max_abs"], max_abs)
        slot["max_rel"] = max(slot["max_rel"], max_rel)
        if not np.all(diff <= self.atol + self.rtol * mag):
            self.failures.append(f"{graph}.{name} at {case}: max abs error {max_abs:.3g} "
                                 f"(atol {self.atol}, rtol {self.rtol})")
