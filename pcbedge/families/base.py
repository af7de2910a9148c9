"""``Family``: the one interface a VLM family implements, for every verb.

* export: load the checkpoint, the graphs with their I/O contract, PyTorch references, parity,
  the family's manifest fields;
* runtime: its ONNX Runtime runner and its PyTorch runner (``ask --model``), both implementing
  :class:`pcbedge.runtime.protocol.Runner` (prepare -> encode -> answer);
* build: which graphs form each graph group (``vision``, ``decoder``) the target's recipe names,
  the calibration feeds of a group, what the recipe does after quantizing (drift, score fixes),
  the target's shapes applied to the manifest, TensorRT shape ranges of its dynamic axes.

Class attributes hold the data; methods that need torch import it themselves, so this module and
a family's ``__init__`` stay importable on a device without torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Iterable


class Family:
    """Base class of a family. A subclass sets the class attributes and implements every method
    that raises NotImplementedError here (tests/test_family_coverage.py checks it)."""

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

    # -- export ------------------------------------------------------------------------------

    def check_model_dir(self, model_dir: Path) -> None:
        """ModelError for a missing folder, missing files or a pickle checkpoint."""
        from pcbedge.families import check_model_files
        check_model_files(Path(model_dir), self.model_files)

    def load_model(self, model_dir: Path):
        """The torch model in eval mode."""
        raise NotImplementedError

    def default_input_size(self, model) -> int:
        raise NotImplementedError

    def graphs(self, model, input_size: int) -> list:
        """The :class:`pcbedge.export.graphs.GraphExport` list, in export order."""
        raise NotImplementedError

    def reference(self, model, graph: str, feeds: dict) -> dict:
        """PyTorch outputs (numpy) of ``graph`` for numpy ``feeds`` (parity)."""
        raise NotImplementedError

    def manifest_extras(self, model, input_size: int) -> dict:
        """The family's manifest fields (kv_cache, visual_tokens, token_scores, answer, ...)."""
        raise NotImplementedError

    def bundle_files(self, model) -> dict[str, str]:
        """Text files the bundle ships beside the graphs ({name: text}; e.g. a chat
        template); list them in the manifest's ``assets`` so they are hashed and checked."""
        return {}

    def check_parity(self, model, bundle_dir: Path, manifest: dict, **kwargs) -> dict:
        """The manifest's ``parity`` block for the staged bundle, or ExportError."""
        raise NotImplementedError

    # -- runtime -----------------------------------------------------------------------------

    def onnx_runner(self, bundle_dir: Path, manifest: dict | None = None, **kwargs):
        """The ONNX Runtime runner of a bundle (``manifest`` given: no hash verification)."""
        raise NotImplementedError

    def torch_runner(self, model_dir: Path, **kwargs):
        """The PyTorch reference runner of a checkpoint folder (``ask --model``)."""
        raise NotImplementedError

    # -- build -------------------------------------------------------------------------------

    def apply_shapes(self, manifest: dict, shapes, say) -> None:
        """Write the target's ``[shapes]`` into the bundle's manifest (default: nothing)."""

    def calibration_feeds(self, group: str, role: str, export_dir: Path, manifest: dict,
                          cal_set) -> Iterable[dict]:
        """Feeds of graph ``role`` (of ``group``) for static INT8 calibration, from the boards
        of ``cal_set``; the FP32 export may be run to make them."""
        raise NotImplementedError

    def after_quantize(self, group: str, stage: Path, export_dir: Path, manifest: dict,
                       profile, cal_set, say) -> dict:
        """What the recipe does once ``group``'s graphs are quantized in ``stage`` (drift
        against the FP32 export, score corrections); its record for the manifest."""
        return {}

    def trt_axis_ranges(self, manifest: dict, profile, pruning) -> dict:
        """(min, opt, max) of every named dynamic axis of the graphs, for TensorRT."""
        raise NotImplementedError
