"""Build recipes: a target profile's recipe applied to an FP32 export (``build_bundle``), the
recipe vocabulary (:mod:`.configs`), the quantizers (:mod:`.quantize`, :mod:`.weights`) and the
TensorRT step (:mod:`.tensorrt`, :mod:`.trt_ops`). Import-light: nothing heavy until a build."""
from __future__ import annotations


def build_bundle(target, export_dir="bundles/export", out_dir=None, **kwargs):
    """See :func:`pcbedge.recipes.build.build_bundle`."""
    from pcbedge.recipes.build import build_bundle as _build
    return _build(target, export_dir, out_dir, **kwargs)


__all__ = ["build_bundle"]
