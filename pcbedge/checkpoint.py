"""A checkpoint's weights: one ``model.safetensors``, or the shards a Hugging Face
``save_pretrained`` writes past its shard size (``model-00001-of-0000N.safetensors`` ... and
``model.safetensors.index.json``, as every published checkpoint of a billion parameters comes).

Every verb that reads a checkpoint goes through here: the folder check, the export's space
estimate, the source-weights hash recorded in a manifest and checked by the bench, and the
families' own loaders. Torch-free (the loader imports safetensors' numpy-free torch API only
when called).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from pcbedge.errors import ModelError

INDEX_SUFFIX = ".index.json"


def index_name(weights_file: str) -> str:
    """``model.safetensors`` -> ``model.safetensors.index.json``."""
    return weights_file + INDEX_SUFFIX


def _read_index(index: Path) -> dict[str, str]:
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"cannot read the shard index {index}: {e}",
                         fix="the index must be the JSON save_pretrained writes "
                             "(a weight_map from tensor names to shard files)") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise ModelError(f"the shard index {index} has no weight_map of tensor names to files",
                         fix="re-save the checkpoint with save_pretrained, or merge it into "
                             "one model.safetensors")
    for name in set(wmap.values()):
        p = PurePosixPath(name)
        if p.name != name or not name.endswith(".safetensors"):
            raise ModelError(f"the shard index {index} names {name!r}, which is not a "
                             "safetensors file in the model folder",
                             fix="shards must sit beside the index (no folders, no other "
                                 "formats)")
    return wmap


def weight_shards(model_dir: str | Path, weights_file: str = "model.safetensors") -> list[Path]:
    """The safetensors files holding the weights, in shard order; ModelError naming what is
    missing (the single file, the index, or a shard the index names)."""
    model_dir = Path(model_dir)
    single, index = model_dir / weights_file, model_dir / index_name(weights_file)
    if single.is_file():
        return [single]
    if not index.is_file():
        raise ModelError(f"{model_dir} lacks {weights_file} (and a shard index "
                         f"{index.name})", fix="a model folder holds its weights as "
                                               "safetensors: one file or save_pretrained's "
                                               "shards with their index")
    shards = [model_dir / n for n in sorted(set(_read_index(index).values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ModelError(f"{model_dir} lacks the shard(s) {', '.join(missing)} named by "
                         f"{index.name}", fix="copy every shard of the checkpoint into the "
                                              "folder")
    return shards


def weights_label(model_dir: str | Path, weights_file: str = "model.safetensors") -> str:
    """What a manifest records as the source weights: the file, or the shard index."""
    model_dir = Path(model_dir)
    return weights_file if (model_dir / weights_file).is_file() else index_name(weights_file)


def weights_bytes(model_dir: str | Path, weights_file: str = "model.safetensors") -> int | None:
    try:
        return sum(p.stat().st_size for p in weight_shards(model_dir, weights_file))
    except (OSError, ModelError):
        return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: str | Path, weights_file: str = "model.safetensors") -> str:
    """sha256 of the single weights file (unchanged from before shards were read); for shards,
    the sha256 of the lines ``<shard name> <shard sha256>`` in shard order, so a changed,
    renamed, added or removed shard changes it."""
    shards = weight_shards(model_dir, weights_file)
    if len(shards) == 1 and shards[0].name == weights_file:
        return _sha256_file(shards[0])
    lines = "".join(f"{p.name} {_sha256_file(p)}\n" for p in shards)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_state(model_dir: str | Path, weights_file: str = "model.safetensors") -> dict:
    """All tensors of the checkpoint (torch), shard by shard; a tensor in two shards or one
    the index places in another shard is refused."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    shards = weight_shards(model_dir, weights_file)
    wmap = (_read_index(model_dir / index_name(weights_file))
            if shards[0].name != weights_file else None)
    state: dict = {}
    for p in shards:
        try:
            part = load_file(str(p))
        except Exception as e:   # safetensors raises its own error types
            raise ModelError(f"{p} cannot be read: {e}",
                             fix="re-save the checkpoint as safetensors") from None
        for k in part:
            if k in state or (wmap is not None and wmap.get(k) != p.name):
                raise ModelError(f"tensor {k!r} of {p.name} is not where {index_name(weights_file)}"
                                 " places it (or is in two shards)",
                                 fix="re-save the checkpoint with save_pretrained")
        state.update(part)
    return state
