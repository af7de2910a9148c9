"""VLM families: one small adapter per family, holding only what differs, registered by name.

A family says how to load its checkpoint folder, which torch modules become which graph (with
dummy inputs, I/O names and dynamic axes), how PyTorch computes each graph's reference outputs
for the parity check, and what it adds to the manifest. Everything else (export, checks,
parity, manifest, atomic write, the runtime) is shared and never branches on a family name.

Every graph of every family follows the bundle contract (docs/export.md): the graph roles
``vision``, ``decoder_prefill``, ``decoder_step`` with the I/O names listed there.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pcbedge.errors import ModelError

_REGISTRY: dict[str, type["VlmFamily"]] = {}
# modules that register the shipped families when imported
_BUILTIN = ("pcbedge.export.families.pcbvlm", "pcbedge.export.families.qwen2_vl")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    """What the exporter needs for one graph: the module, example inputs and the I/O contract.

    ``dynamic_shapes`` is the torch.export form (dynamo exporter); the legacy exporter's
    ``dynamic_axes`` are derived from the ``str`` axes of ``inputs`` and ``outputs``.
    """

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


class VlmFamily:
    """Base class of a family adapter. Subclasses set the class attributes and the methods."""

    name: ClassVar[str] = ""
    model_files: ClassVar[tuple[str, ...]] = ()   # files a checkpoint folder must hold
    weights_file: ClassVar[str] = ""               # hashed into the manifest's source_model
    bundle_copies: ClassVar[tuple[str, ...]] = ()  # checkpoint files copied into the bundle
    # {graph: (score output, outputs ranked by it)}: outputs whose axis 1 is sorted by a score
    # (TopK); near-equal scores may come out in another order, which parity tolerates
    ranked_outputs: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}
    # the graphs the family exports (the manifest's runner says which ones a runtime needs)
    graph_roles: ClassVar[tuple[str, ...]] = ("vision", "decoder_prefill", "decoder_step")

    def check_model_dir(self, model_dir: Path) -> None:
        """ModelError for a missing folder, missing files or a pickle checkpoint."""
        check_model_files(model_dir, self.model_files)

    def load_model(self, model_dir: Path):
        """The torch model in eval mode."""
        raise NotImplementedError

    def graphs(self, model, input_size: int) -> list[GraphExport]:
        """The graphs to export, in the order they are exported."""
        raise NotImplementedError

    def reference(self, model, graph: str, feeds: dict) -> dict:
        """PyTorch outputs (numpy) of ``graph`` for the numpy ``feeds`` (parity check)."""
        raise NotImplementedError

    def reference_answer(self, model, x, question: str, meta, keep=None) -> dict:
        """The PyTorch answer (with ``token_ids``) for one preprocessed input."""
        raise NotImplementedError

    def default_input_size(self, model) -> int:
        raise NotImplementedError

    def manifest_extras(self, model, input_size: int) -> dict:
        """Family fields of the manifest: kv_cache, visual_tokens, num_regions, answer, ..."""
        raise NotImplementedError

    def check_parity(self, model, bundle_dir: Path, manifest: dict, **kwargs) -> dict:
        """The manifest's ``parity`` block for the staged bundle, or ExportError. The default
        checks the graphs of the bundle contract (pcbedge.export.parity)."""
        from pcbedge.export.parity import check_parity
        return check_parity(self, model, bundle_dir, manifest, **kwargs)


def register_family(name: str) -> Callable[[type[VlmFamily]], type[VlmFamily]]:
    """Class decorator: register a VlmFamily subclass under ``name`` (config.json model_type)."""
    def deco(cls: type[VlmFamily]) -> type[VlmFamily]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"family {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_builtin() -> None:
    for mod in _BUILTIN:
        importlib.import_module(mod)


def registered_families() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_family(name: str) -> VlmFamily:
    """An instance of the family adapter ``name``; ModelError listing the known ones otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ModelError(f"unknown model family {name!r}",
                         fix=f"registered families: {', '.join(sorted(_REGISTRY))}; "
                             "add an adapter under pcbedge/export/families/ for a new one")
    return _REGISTRY[name]()


def detect_family(model_dir: str | Path) -> VlmFamily:
    """The family of a checkpoint folder, from its config.json ``model_type``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} not found",
                         fix="pass a folder holding config.json and model.safetensors")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        _refuse_pickles(model_dir)
        raise ModelError(f"{model_dir} holds no config.json, so its model family is unknown",
                         fix="pass a model folder in the Hugging Face layout (config.json, "
                             "model.safetensors, tokenizer.json)")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"cannot read {cfg}: {e}", fix="config.json must be a JSON object "
                                                         "with a model_type field") from None
    if not isinstance(model_type, str):
        raise ModelError(f"{cfg} has no model_type", fix="add the model_type of the family "
                                                          f"({', '.join(registered_families())})")
    return get_family(model_type)


def _refuse_pickles(model_dir: Path, missing: list[str] | None = None) -> None:
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        lacks = f"lacks {', '.join(missing)} and " if missing else ""
        raise ModelError(f"{model_dir} {lacks}holds pickle checkpoints {pickles}, which are "
                         "refused (loading a pickle runs arbitrary code)",
                         fix="convert the weights to model.safetensors")


def check_model_files(model_dir: Path, files: tuple[str, ...]) -> None:
    missing = [f for f in files if not (model_dir / f).is_file()]
    if missing:
        _refuse_pickles(model_dir, missing)
        raise ModelError(f"{model_dir} lacks {', '.join(missing)}",
                         fix=f"a model folder of this family holds {', '.join(files)}")
