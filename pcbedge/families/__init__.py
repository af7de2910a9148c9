"""The family registry: one line per VLM family, ``model_type -> "module:Class"``.

A family is one folder under ``pcbedge/families/`` holding everything that differs between VLMs:
its export graphs and parity check, its runners (ONNX Runtime and PyTorch), preprocessing,
answer parser, the recipe hooks of its graph groups (calibration feeds, drift, score fixes) and
its visual-token scores. The core (bundle, export, recipes, runtime, bench, targets) reads a
bundle's manifest, asks this registry for the family it names, and never names one itself.

Classes are imported on first use, so the registry costs nothing to import (the device never
imports torch: a family's ``__init__`` stays torch-free and imports its torch parts lazily).
Adding a family = its folder + one line in ``FAMILIES`` (or :func:`register_family` at run time).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from pcbedge.errors import ModelError

# config.json ``model_type`` -> "module:Class" of its Family
FAMILIES: dict[str, str] = {
    "pcbvlm": "pcbedge.families.pcbvlm:PcbVlmFamily",
    "qwen2_vl": "pcbedge.families.qwen_vl:Qwen2VlFamily",
    "qwen2_5_vl": "pcbedge.families.qwen_vl:Qwen25VlFamily",
}
# the family whose shipped reference model a verb uses when it is given no model, and whose
# training `pcbedge finetune` runs
DEFAULT_FAMILY = "pcbvlm"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LOADED: dict[str, type] = {}


def register_family(name: str, spec: str | type) -> None:
    """Register a family at run time (a plugin, or a test's own family): ``spec`` is the
    ``"module:Class"`` path or the class itself."""
    if name in FAMILIES and FAMILIES[name] != spec:
        raise ValueError(f"family {name!r} is registered twice")
    FAMILIES[name] = spec
    _LOADED.pop(name, None)


def unregister_family(name: str) -> None:
    FAMILIES.pop(name, None)
    _LOADED.pop(name, None)


def registered_families() -> list[str]:
    return sorted(FAMILIES)


def _load(name: str) -> type:
    if name not in _LOADED:
        spec = FAMILIES[name]
        if isinstance(spec, str):
            module, _, cls = spec.partition(":")
            spec = getattr(importlib.import_module(module), cls)
        spec.name = name
        _LOADED[name] = spec
    return _LOADED[name]


def get_family(name: str):
    """An instance of the family ``name``; ModelError listing the registered ones otherwise."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}",
                         fix=f"registered families: {', '.join(registered_families())}; a new "
                             "family is a folder under pcbedge/families/ and one line in "
                             "pcbedge.families.FAMILIES")
    return _load(name)()


def default_model() -> Path:
    """The reference model folder that :data:`DEFAULT_FAMILY` ships (torch-free)."""
    return _load(DEFAULT_FAMILY).reference_model


def detect_family(model_dir: str | Path):
    """The family of a checkpoint folder, from its config.json ``model_type``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} not found",
                         fix="pass a folder holding config.json and the safetensors weights")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        refuse_pickles(model_dir)
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


def refuse_pickles(model_dir: Path, missing: list[str] | None = None) -> None:
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        lacks = f"lacks {', '.join(missing)} and " if missing else ""
        raise ModelError(f"{model_dir} {lacks}holds pickle checkpoints {pickles}, which are "
                         "refused (loading a pickle runs arbitrary code)",
                         fix="convert the weights to model.safetensors")


def check_model_files(model_dir: Path, files: tuple[str, ...]) -> None:
    """Every file of ``files`` is in ``model_dir``; a ``*.safetensors`` entry may be
    save_pretrained's shards with their index instead (:mod:`pcbedge.checkpoint`)."""
    from pcbedge.checkpoint import weight_shards
    missing = [f for f in files if not (model_dir / f).is_file()]
    for f in [f for f in missing if f.endswith(".safetensors")]:
        if (model_dir / (f + ".index.json")).is_file():
            weight_shards(model_dir, f)        # the index and every shard it names
            missing.remove(f)
    if missing:
        refuse_pickles(model_dir, missing)
        raise ModelError(f"{model_dir} lacks {', '.join(missing)}",
                         fix=f"a model folder of this family holds {', '.join(files)}")
