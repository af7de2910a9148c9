"""Export a VLM checkpoint to an ONNX bundle (graphs + tokenizer + manifest).

Import-light on purpose: the runtime imports ``pcbedge.bundle.manifest`` on device, where torch
is absent, so nothing here imports torch until :func:`export_model` is called.
"""
from __future__ import annotations


def export_model(model_dir, out_dir, **kwargs):
    """See :func:`pcbedge.export.exporter.export_model`."""
    from pcbedge.export.exporter import export_model as _export
    return _export(model_dir, out_dir, **kwargs)


__all__ = ["export_model"]
