"""Sharded checkpoints (save_pretrained past its shard size: model-0000K-of-0000N.safetensors and
model.safetensors.index.json) load in every verb that reads a checkpoint: the folder check,
export (with parity), ask --model and bench's source-weights check; broken indexes are typed
errors naming the file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pcbedge.errors import ModelError
from pcbedge.checkpoint import load_state, weight_shards, weights_label, weights_sha256

torch = pytest.importorskip("torch")


def _shard(folder: Path, n: int = 2) -> list[str]:
    """Split folder/model.safetensors into ``n`` shards with save_pretrained's names and index."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    names, wmap = [], {}
    for k in range(n):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = {key: state[key] for key in keys[k::n]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        wmap.update({key: name for key in part})
        names.append(name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": wmap}))
    (folder / "model.safetensors").unlink()
    return names


@pytest.fixture
def pcbvlm_pair(tmp_path):
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm
    single = tiny_pcbvlm(tmp_path / "single")
    sharded = tiny_pcbvlm(tmp_path / "sharded")
    _shard(sharded)
    return single, sharded


def test_single_file_hash_is_the_file_sha256(tmp_path):
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm
    folder = tiny_pcbvlm(tmp_path)
    want = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(folder) == want            # manifests made before shards still match
    assert weights_label(folder) == "model.safetensors"


@pytest.mark.covers("pcbvlm", "export")
def test_pcbvlm_shards_load_export_and_answer(pcbvlm_pair, tmp_path, monkeypatch):
    from pcbedge.export import exporter
    from pcbedge.export.exporter import export_model
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)   # weights in .onnx.data, as at 2B

    single, sharded = pcbvlm_pair
    assert len(weight_shards(sharded)) == 2
    a, b = PcbVlm.from_pretrained(single), PcbVlm.from_pretrained(sharded)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bundle = export_model(sharded, tmp_path / "bundle", check=True, progress=False)
    src = json.loads((bundle / "manifest.json").read_text())["source_model"]
    assert src["weights"] == "model.safetensors.index.json"
    assert src["sha256"] == weights_sha256(sharded)
    from pcbedge.benchmarks.reference import source_of
    assert source_of(sharded).sha256 == src["sha256"]   # bench's reference check matches
    import os
    mask = os.umask(0)
    os.umask(mask)
    assert list(bundle.glob("*.onnx.data"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in bundle.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes      # shareable, as the user's umask


@pytest.mark.covers("qwen2_vl", "export")
def test_qwen_save_pretrained_shards_export_with_parity(tmp_path):
    pytest.importorskip("transformers")
    from pcbedge.export.exporter import export_model
    from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl, tiny_qwen2_vl_model

    folder = tiny_qwen2_vl(tmp_path)
    model, _ = tiny_qwen2_vl_model("qwen2_vl")
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(weight_shards(folder)) >= 2
    bundle = export_model(folder, tmp_path / "bundle", check=True, progress=False)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["source_model"]["weights"] == "model.safetensors.index.json"
    assert m["parity"]["passed"] is True


def test_a_missing_shard_is_named(pcbvlm_pair):
    _, sharded = pcbvlm_pair
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        weight_shards(sharded)
    from pcbedge.families import detect_family
    with pytest.raises(ModelError, match="lacks the shard"):
        detect_family(sharded).check_model_dir(sharded)


@pytest.mark.parametrize("bad", [
    {"weight_map": {"a": "../elsewhere.safetensors"}},
    {"weight_map": {"a": "model.bin"}},
    {"weight_map": {}},
    ["not", "an", "object"],
])
def test_a_bad_index_is_refused(pcbvlm_pair, bad):
    _, sharded = pcbvlm_pair
    (sharded / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="index"):
        weight_shards(sharded)


def test_a_tensor_outside_its_indexed_shard_is_refused(pcbvlm_pair):
    _, sharded = pcbvlm_pair
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    key = next(iter(doc["weight_map"]))
    doc["weight_map"][key] = ("model-00002-of-00002.safetensors"
                              if doc["weight_map"][key].startswith("model-00001")
                              else "model-00001-of-00002.safetensors")
    index.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        load_state(sharded)


def test_the_shards_hash_changes_with_any_shard(pcbvlm_pair):
    _, sharded = pcbvlm_pair
    before = weights_sha256(sharded)
    p = sharded / "model-00001-of-00002.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    assert weights_sha256(sharded) != before
