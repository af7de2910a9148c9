"""``Family``: the one interface a VLM family implements, for every verb.

* export: load the checkpoint, the graphs with their I/O contract, PyTorch references, parity,
  the family's manifest fields;
* runtime: its ONNX Runtime runner and its PyTorch runner (``ask --model``), both implementing
  :class:`pcbedge.runtime.protocol.Runner` (prepare -> encode -> answer);
* build: which graphs form each graph group (``vision``, ``decoder``) the target's recipe names,
  the calibration feeds of a group, what the recipe does after quantizing (drift, score fixes),
  the target's shapes applied to the manifest, TensorRT shape ranges of its dynamic axes.

Class attributes hold the data. ``modules`` names the family's modules by role (``export``,
``parity``, ``runner``, ``torch_runner``, ``recipe``); the methods below call the functions of
those modules, imported on first use, so this module and a family's ``__init__`` stay importable
on a device without torch and a family's ``__init__`` is its data alone. A family may also
override a method directly (tests/toyfamily does).

A role module provides: ``export`` -> ``load_model(model_dir, family)``,
``default_input_size(model)``, ``graphs(model, input_size)``, ``reference(model, graph, feeds)``,
``manifest_extras(model, input_size)`` (and optionally ``bundle_files(model)``); ``parity`` ->
``check_parity(family, model, bundle_dir, manifest, **kwargs)``; ``runner`` / ``torch_runner``
-> ``open_runner(path, manifest_or_none / family=..., **kwargs)``; ``recipe`` ->
``apply_shapes``, ``calibration_feeds``, ``after_quantize``, ``trt_axis_ranges``; ``plan`` ->
``plan_calls`` (one typical answer's graph calls, for ``pcbedge plan``), with the signatures of
the methods here; ``testing`` -> ``tiny_model(folder)`` (a tiny random-weight checkpoint for the
tests, saved under ``folder``); optionally ``train`` -> ``finetune(data_dir, out_dir, **kw)``.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import ClassVar, Iterable


class Family:
    """Base class of a family: data in class attributes, behaviour in its role modules
    (tests/test_family_coverage.py checks every family provides every role)."""

    name: ClassVar[str] = ""                       # set by the registry
    profile_key: ClassVar[str] = ""                # [family.<key>] overrides of target profiles
    model_files: ClassVar[tuple[str, ...]] = ()    # files a checkpoint folder must hold
    weights_file: ClassVar[str] = "model.safetensors"   # hashed into source_model
    bundle_copies: ClassVar[tuple[str, ...]] = ()  # checkpoint files copied into the bundle
    graph_roles: ClassVar[tuple[str, ...]] = ()    # graphs the family exports
    # the recipe's graph groups -> graph roles; roles in no group stay as exported
    graph_groups: ClassVar[dict[str, tuple[str, ...]]] = {}
    # {graph: (score output, outputs ranked by it)}: outputs sorted by a score (TopK), whose
    # near-equal scores may come out in another order (parity tolerates that)
    ranked_outputs: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}
    template_optional: ClassVar[bool] = False      # can answer without a golden template
    # the float types its graphs export in (``pcbedge export --precision``; export/precision.py)
    export_precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    reference_model: ClassVar[Path | None] = None  # a model folder the family ships, if any
    modules: ClassVar[dict[str, str]] = {}         # role -> module path (imported on demand)

    def finetune(self, data_dir, out_dir, **kwargs):
        """Train the family's model on a DeepPCB-layout split: its ``train`` module's
        ``finetune(data_dir, out_dir, **kwargs)``; NotImplementedError for a family without."""
        return self.module("train").finetune(data_dir, out_dir, **kwargs)

    def module(self, role: str):
        """The family's module for ``role``; NotImplementedError when it declares none."""
        if role not in self.modules:
            raise NotImplementedError(f"family {self.name!r} declares no {role!r} module")
        return importlib.import_module(self.modules[role])

    # -- export ------------------------------------------------------------------------------

    def check_model_dir(self, model_dir: Path) -> None:
        """ModelError for a missing folder, missing files or a pickle checkpoint."""
        from pcbedge.families import check_model_files
        check_model_files(Path(model_dir), self.model_files)

    def load_model(self, model_dir: Path, dtype=None):
        """The torch model in eval mode; ``dtype`` (a torch float type) loads it in that type
        where the family's ``load_model`` takes one (the weights never pass through float32),
        else converts it after loading."""
        load = self.module("export").load_model
        if dtype is None:
            return load(Path(model_dir), self)
        if "dtype" in inspect.signature(load).parameters:
            return load(Path(model_dir), self, dtype=dtype)
        return load(Path(model_dir), self).to(dtype)

    def default_input_size(self, model) -> int:
        return self.module("export").default_input_size(model)

    def graphs(self, model, input_size: int) -> list:
        """The :class:`pcbedge.export.graphs.GraphExport` list, in export order."""
        return self.module("export").graphs(model, input_size)

    def reference(self, model, graph: str, feeds: dict) -> dict:
        """PyTorch outputs (numpy) of ``graph`` for numpy ``feeds`` (parity)."""
        return self.module("export").reference(model, graph, feeds)

    def manifest_extras(self, model, input_size: int) -> dict:
        """The family's manifest fields (kv_cache, visual_tokens, token_scores, answer, ...)."""
        return self.module("export").manifest_extras(model, input_size)

    def bundle_files(self, model) -> dict[str, str]:
        """Text files the bundle ships beside the graphs ({name: text}; e.g. a chat
        template); list them in the manifest's ``assets`` so they are hashed and checked."""
        export = self.module("export") if "export" in self.modules else None
        return export.bundle_files(model) if hasattr(export, "bundle_files") else {}

    def check_parity(self, model, bundle_dir: Path, manifest: dict, **kwargs) -> dict:
        """The manifest's ``parity`` block for the staged bundle, or ExportError. ``model``:
        the model, or a :class:`pcbedge.export.graphs.ModelHandle` where
        :attr:`parity_releases_model`."""
        return self.module("parity").check_parity(self, model, Path(bundle_dir), manifest,
                                                  **kwargs)

    @property
    def parity_releases_model(self) -> bool:
        """The family's parity check takes a ModelHandle and runs its ONNX Runtime phase with
        the PyTorch weights released (a 2B model's FP32 weights would sit beside the
        sessions' own copy: ~19 GB instead of ~11)."""
        return "parity" in self.modules and bool(getattr(self.module("parity"),
                                                         "RELEASES_MODEL", False))

    # -- runtime -----------------------------------------------------------------------------

    def onnx_runner(self, bundle_dir: Path, manifest: dict | None = None, **kwargs):
        """The ONNX Runtime runner of a bundle (``manifest`` given: no hash verification)."""
        return self.module("runner").open_runner(Path(bundle_dir), manifest, **kwargs)

    def torch_runner(self, model_dir: Path, **kwargs):
        """The PyTorch reference runner of a checkpoint folder (``ask --model``)."""
        return self.module("torch_runner").open_runner(Path(model_dir), family=self, **kwargs)

    # -- build -------------------------------------------------------------------------------

    def apply_shapes(self, manifest: dict, shapes, say) -> None:
        """Write the target's ``[shapes]`` into the bundle's manifest."""
        self.module("recipe").apply_shapes(manifest, shapes, say)

    def calibration_feeds(self, group: str, role: str, export_dir: Path, manifest: dict,
                          cal_set) -> Iterable[dict]:
        """Feeds of graph ``role`` (of ``group``) for static INT8 calibration, from the boards
        of ``cal_set``; the FP32 export may be run to make them."""
        return self.module("recipe").calibration_feeds(group, role, export_dir, manifest, cal_set)

    def after_quantize(self, group: str, stage: Path, export_dir: Path, manifest: dict,
                       profile, cal_set, say) -> dict:
        """What the recipe does once ``group``'s graphs are quantized in ``stage`` (drift
        against the FP32 export, score corrections); its record for the manifest."""
        recipe = self.module("recipe") if "recipe" in self.modules else None
        if not hasattr(recipe, "after_quantize"):
            return {}
        return recipe.after_quantize(group, stage, export_dir, manifest, profile, cal_set, say)

    # -- plan --------------------------------------------------------------------------------

    def plan_calls(self, manifest: dict, typical: dict) -> tuple[list, dict]:
        """The graph calls of one typical answer (:class:`pcbedge.plan.Call` list, with the
        sizes of their named axes) and what the answer is (tokens, pixels, KV positions):
        ``pcbedge plan`` costs them. ``typical`` overrides the family's typical sizes."""
        return self.module("plan").plan_calls(manifest, typical)

    def trt_axis_ranges(self, manifest: dict, profile, pruning) -> dict:
        """(min, opt, max) of every named dynamic axis of the graphs, for TensorRT."""
        return self.module("recipe").trt_axis_ranges(manifest, profile, pruning)
