"""The public Python API: a few verbs, each a thin entry to the module that does the work.

Heavy dependencies (torch, onnx, the quantizers) are imported inside each verb, so importing
``pcbedge.api`` (and ``pcbedge --help``) stays light.
"""
from __future__ import annotations

from pathlib import Path

from pcbedge.families import DEFAULT_FAMILY, default_model

# the shipped reference model of the registry's default family (its package is torch-free)
DEFAULT_MODEL: Path = default_model()


def export_model(model_dir: str | Path | None = None, out_dir: str | Path = "bundles/export",
                 **kwargs) -> Path:
    """Export a fine-tuned VLM (Hugging Face layout) to ONNX graphs + manifest, checked against
    PyTorch. Needs the [export] extra."""
    from pcbedge.export.exporter import export_model as _export
    return _export(model_dir or DEFAULT_MODEL, out_dir, **kwargs)


def build_bundle(target: str, export_dir: str | Path = "bundles/export",
                 out_dir: str | Path | None = None, **kwargs) -> Path:
    """Apply a target profile's recipe (INT8, pruning, engine or session options) to an export."""
    from pcbedge.recipes.build import build_bundle as _build
    return _build(target, export_dir, out_dir, **kwargs)


def run_benchmark(bundle: str | Path, **kwargs) -> dict:
    """Latency and accuracy drift of a bundle on real boards, with named gates."""
    from pcbedge.benchmarks.harness import run_benchmark as _bench
    return _bench(bundle, **kwargs)


def plan(bundle: str | Path, target=None, **typical) -> dict:
    """Predicted per-stage latency, P50 against the budget and peak memory of ``bundle`` on
    ``target`` (a name, a .toml path or a profile; default: the bundle's own), from its graphs
    and the target's [hardware] figures. ``typical`` overrides the family's typical answer
    (e.g. ``new_tokens=16``, ``keep_ratio=0.25``)."""
    from pcbedge.plan import plan_bundle
    return plan_bundle(bundle, target, typical=typical)


def load_runner(path: str | Path | None = None, **kwargs):
    """A runner for a bundle (ONNX Runtime, no torch) or a model folder (PyTorch reference)."""
    from pcbedge.runtime import load_runner as _load
    return _load(path or DEFAULT_MODEL, **kwargs)


def finetune(data_dir: str | Path, out_dir: str | Path, **kwargs):
    """Train the default family's reference VLM on a DeepPCB-layout trainval split."""
    from pcbedge.families import get_family
    return get_family(DEFAULT_FAMILY).finetune(data_dir, out_dir, **kwargs)


def list_targets():
    """The shipped target profiles."""
    from pcbedge.targets import list_targets as _list
    return _list()
