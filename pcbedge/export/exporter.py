"""``export_model``: a checkpoint folder -> ONNX graphs + tokenizer + manifest, checked and atomic.

Steps: load -> export each graph (dynamo exporter, legacy TorchScript exporter as a fallback)
-> onnx.checker -> parity with PyTorch -> manifest (last) -> rename into place.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import platform
import shutil
import time
from pathlib import Path

from pcbedge.errors import DependencyError, ExportError, OutputError
from pcbedge.bundle.atomic import check_output, staged_dir
from pcbedge.bundle.outputs import raise_write_failure
from pcbedge.export.graphs import GraphExport, ModelHandle
from pcbedge.export.precision import (DEFAULT_OPSET, DEFAULT_PRECISION, TOLERANCES,
                                      at_precision, check_precision, torch_dtype)
from pcbedge.checkpoint import weights_bytes, weights_label, weights_sha256
from pcbedge.bundle.manifest import KIND, SCHEMA_VERSION, list_files, write_manifest

log = logging.getLogger(__name__)

MIN_OPSET = 17
from pcbedge.bundle.graph_io import EXTERNAL_DATA_BYTES, shareable   # past it: .onnx.data


def export_model(model_dir: str | Path, out_dir: str | Path, *, opset: int | None = None,
                 check: bool = True, check_boards: int | None = None, atol: float | None = None,
                 rtol: float | None = None, parity_sizes=None, overwrite: bool = False,
                 precision: str = DEFAULT_PRECISION, progress: bool = True) -> Path:
    """Export the VLM in ``model_dir`` into the bundle folder ``out_dir`` and return it.

    ``check`` runs the parity check (every graph vs PyTorch at several input sizes and on
    ``check_boards`` boards of the embedded sample, default 4, plus the whole answer loop) and
    raises ExportError past ``atol + rtol * |reference|`` (default: the precision's
    tolerances, 1e-3 for fp32). ``parity_sizes`` overrides the (height, width) sizes checked.
    ``precision``: the graphs' float type, fp32 / fp16 / bf16 (:mod:`pcbedge.export.precision`).
    ``out_dir`` must not exist or be empty unless ``overwrite``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _require("torch", "onnx", "onnxscript", "onnxruntime")
    if opset is not None:
        _check_opset(opset)
    from pcbedge.families import detect_family
    family = detect_family(model_dir)
    opset = check_precision(precision, check, family, opset)
    default_atol, default_rtol = TOLERANCES[precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    family.check_model_dir(model_dir)
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise OutputError(f"output folder {out_dir} overlaps the model folder {model_dir}",
                          fix="write the bundle to a folder outside the model folder")
    inputs = {"model folder": model_dir}
    check_output(out_dir.absolute(), overwrite=overwrite, inputs=inputs)
    steps = ["load model", *[f"export {g}" for g in family.graph_roles],
             "parity" if check else "skip parity", "manifest"]
    needed = weights_bytes(model_dir, family.weights_file)   # the graphs hold the weights
    with _progress_bar(steps, progress) as bar, staged_dir(
            out_dir, overwrite=overwrite, inputs=inputs, needed=needed) as stage:
        bar.set_description(steps[0])
        dtype = None if precision == DEFAULT_PRECISION else torch_dtype(precision)
        model = (family.load_model(model_dir) if dtype is None
                 else family.load_model(model_dir, dtype=dtype))
        input_size = family.default_input_size(model)
        memory = {"load model": peak_rss_mb()}
        bar.update()
        graph_records = {}
        for g in family.graphs(model, input_size):
            g = at_precision(g, precision)
            bar.set_description(f"export {g.name}")
            graph_records[g.name] = export_graph(g, stage, opset)
            memory[f"export {g.name}"] = peak_rss_mb()
            bar.set_postfix_str(f"peak RSS {memory[f'export {g.name}'] / 1024:.1f} GB")
            bar.update()
        for name in family.bundle_copies:
            shutil.copyfile(model_dir / name, stage / name)
        for name, text in family.bundle_files(model).items():
            (stage / name).write_text(text, encoding="utf-8")
        manifest = build_manifest(family, model, model_dir, input_size, graph_records)
        manifest["export_precision"] = precision
        manifest["precision"] = {k: precision for k in manifest.get("precision") or {}}
        bar.set_description(steps[-2])
        manifest["parity"] = None
        if check:
            # parity's reference is PyTorch in float32 whatever the graphs' precision
            if family.parity_releases_model:
                g = None   # the last graph's wrapper module holds the model too
                model = ModelHandle(model if dtype is None else None,
                                    lambda: family.load_model(model_dir))
                gc.collect()
            elif dtype is not None:
                model = model.float()
            manifest["parity"] = family.check_parity(model, stage, manifest, sizes=parity_sizes,
                                                     boards=check_boards, atol=atol, rtol=rtol)
            memory["parity"] = peak_rss_mb()
        manifest["export_peak_rss_mb"] = memory
        bar.update()
        bar.set_description("manifest")
        manifest["files"] = list_files(stage)
        shareable(stage)
        write_manifest(stage, manifest, partial=True)   # revealed as manifest.json last
        bar.update()
    return out_dir


def _require(*modules: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"export needs {', '.join(missing)}, not installed",
                              fix="pip install 'pcbedge[export]'")


def _check_opset(opset) -> None:
    import onnx.defs
    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset!r} is not supported",
                          fix=f"use an opset from {MIN_OPSET} to {top} (default {DEFAULT_OPSET})")


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (each export step records it)."""
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 * (1 / 1024 if platform.system() == "Darwin" else 1), 1)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(steps: list[str], enabled: bool):
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm
    with tqdm(total=len(steps), unit="step", desc=steps[0]) as bar:
        yield bar


def export_graph(g: GraphExport, folder: Path, opset: int) -> dict:
    """Export one graph (dynamo first, TorchScript exporter on failure), name its dynamic axes,
    run onnx.checker; return the manifest's record of it."""
    import torch

    path = folder / g.file
    big = sum(p.numel() * p.element_size() for p in g.module.parameters()) > EXTERNAL_DATA_BYTES
    names = dict(input_names=[t.name for t in g.inputs], output_names=[t.name for t in g.outputs])
    method, fallback_reason = "dynamo", None
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(g.module, g.args, None, **names, opset_version=opset,
                                        dynamic_shapes=g.dynamic_shapes, dynamo=True,
                                        external_data=big, verbose=False)
            program.save(str(path), external_data=big)
    except Exception as e:  # the dynamo exporter raises many types; fall back, say why
        raise_write_failure(e, within=(folder,))   # a full disk: no fallback would help
        fallback_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        log.warning("dynamo export of %s failed (%s); using the TorchScript exporter",
                    g.name, fallback_reason)
        for p in folder.glob(f"{g.file}*"):
            p.unlink()
        method = "torchscript"
        try:
            with torch.no_grad(), _quiet():
                torch.onnx.export(g.module, g.args, str(path), **names, opset_version=opset,
                                  dynamic_axes=g.dynamic_axes(), dynamo=False,
                                  do_constant_folding=True)
        except Exception as e2:
            raise_write_failure(e2, within=(folder,))
            raise ExportError(f"graph {g.name} failed to export with both exporters: "
                              f"dynamo: {fallback_reason}; torchscript: {type(e2).__name__}: "
                              f"{str(e2).strip().splitlines()[0][:300]}",
                              fix="see docs/export.md (tracing patches in the family "
                                  "folder)") from e2
    actual_opset = finalize_graph(path, g, big)
    return {"file": g.file, "exporter": method, "fallback_reason": fallback_reason,
            "opset": actual_opset, "export_seconds": round(time.perf_counter() - t0, 2),
            "inputs": [t.to_dict() for t in g.inputs],
            "outputs": [t.to_dict() for t in g.outputs]}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress to stdout and log optional-op warnings (torchvision);
    keep both out of the user's terminal. Real failures still raise."""
    import warnings
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def finalize_graph(path: Path, g: GraphExport, external: bool) -> int:
    """Check the graph's I/O against the contract, name its dynamic axes, run onnx.checker."""
    import onnx

    # the graph alone: an exporter's side-car weights stay on disk (a 2B decoder's 6 GB would
    # otherwise be read in, copied into one protobuf and written out again)
    model = onnx.load(str(path), load_external_data=False)
    for what, values, specs in (("inputs", model.graph.input, g.inputs),
                                ("outputs", model.graph.output, g.outputs)):
        got = [v.name for v in values]
        if got != [t.name for t in specs]:
            raise ExportError(f"graph {g.name} has {what} {got}, expected "
                              f"{[t.name for t in specs]}", fix="fix the family's export.py")
        for v, spec in zip(values, specs):
            _name_axes(g.name, v, spec)
    if external:
        _save_external(model, path, f"{g.file}.data")
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _save_external(model, path: Path, data_name: str) -> None:
    """Rewrite ``path`` (the graph) keeping its weights in the one side-car file ``data_name``:
    when the exporter already wrote them there, only the graph is rewritten (the weights never
    pass through memory); otherwise they are read in and written to ``data_name``."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    locations = {e.value for t in _all_tensors(model) if uses_external_data(t)
                 for e in t.external_data if e.key == "location"}
    if locations == {data_name}:
        onnx.save(model, str(path))
        return
    load_external_data_for_model(model, str(path.parent))
    for p in path.parent.glob(f"{path.name}*"):
        p.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_name)


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors
    return _get_all_tensors(model)


def _name_axes(graph: str, value, spec) -> None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(spec.shape):
        raise ExportError(f"graph {graph} {spec.name} has rank {len(dims)}, expected "
                          f"{len(spec.shape)} ({spec.shape})", fix="fix the family's export.py")
    for i, (d, want) in enumerate(zip(dims, spec.shape)):
        if isinstance(want, str):
            d.dim_param = want
        elif d.HasField("dim_value") and d.dim_value != want:
            raise ExportError(f"graph {graph} {spec.name} axis {i} is {d.dim_value}, "
                              f"expected {want}", fix="fix the family's export.py")
        elif not d.HasField("dim_value"):
            # the TorchScript exporter leaves some fixed output axes symbolic; parity checks
            # the real shapes, so declaring the contract's size here is safe
            d.dim_value = want


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "tokenizers", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:
        out["pcbedge"] = md.version("pcbedge")
    except md.PackageNotFoundError:
        import pcbedge
        out["pcbedge"] = getattr(pcbedge, "__version__", "0+source")
    return out


def build_manifest(family, model, model_dir: Path, input_size: int,
                   graphs: dict) -> dict:
    """Everything but ``parity`` and ``files`` (added once the bundle is complete)."""
    sha = weights_sha256(model_dir, family.weights_file)   # ModelError naming what is missing
    opsets = {g["opset"] for g in graphs.values()}
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "family": family.name,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "graphs": graphs,
        "graph_groups": {g: list(roles) for g, roles in family.graph_groups.items()},
        "exporter": {"opset": max(opsets),
                     "methods": sorted({g["exporter"] for g in graphs.values()})},
        **family.manifest_extras(model, input_size),
        "pruning": None,
        "runtime": {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"],
                    "threads": None, "spin_wait": "during_run"},
        "tools": tool_versions(),
        "source_model": {"name": model_dir.resolve().name,
                         "weights": weights_label(model_dir, family.weights_file),
                         "sha256": sha},
    }
