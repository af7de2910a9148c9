"""Export of the pcbvlm family: graphs, parity, KV cache, answers, atomic write (tiny models)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pcbedge.errors import ExportError, ModelError, OutputError
from pcbedge.export import exporter
from pcbedge.export.exporter import export_model
from pcbedge.families import get_family
from pcbedge.bundle.manifest import SCHEMA_VERSION, read_manifest, sha256_file
from pcbedge.testing import random_pair_input, tiny_bundle
from pcbedge.families.pcbvlm.testing import tiny_pcbvlm

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")


@pytest.fixture(scope="module")
def model(exported):
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    return PcbVlm.from_pretrained(exported[0])


def _session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.covers("pcbvlm", "export")
def test_bundle_layout_and_manifest(exported):
    model_dir, bundle = exported
    m = read_manifest(bundle)
    assert sorted(p.name for p in bundle.iterdir()) == [
        "decoder_prefill.onnx", "decoder_step.onnx", "manifest.json", "tokenizer.json",
        "vision.onnx"]
    assert m["schema_version"] == SCHEMA_VERSION and m["family"] == "pcbvlm"
    assert set(m["files"]) == {"vision.onnx", "decoder_prefill.onnx", "decoder_step.onnx",
                               "tokenizer.json"}
    assert m["source_model"]["sha256"] == sha256_file(model_dir / "model.safetensors")
    assert m["visual_tokens"] == (128 // 32) ** 2 and m["num_regions"] == 8
    assert m["max_question_tokens"] == m["max_text_len"] // 2
    assert m["answer"]["parser"] == "pcbvlm-pointer-v3" == m["answer"]["grammar"]["kind"]
    assert m["precision"] == {"vision": "fp32", "decoder": "fp32"} and m["pruning"] is None
    assert m["runtime"]["engine"] == "onnxruntime" and m["runtime"]["threads"] is None
    assert {"torch", "onnx", "onnxruntime", "pcbedge"} <= set(m["tools"])
    assert m["kv_cache"]["layout"] == ["layer", "kv", "batch", "head", "seq", "head_dim"]
    assert m["preprocess"]["input_size"] == 128 and m["preprocess"]["channels"][2] == "abs_diff"
    for g in m["graphs"].values():
        assert g["exporter"] in ("dynamo", "torchscript") and g["opset"] >= 17


def test_graph_io_matches_manifest_and_checker(exported):
    import onnx
    _, bundle = exported
    m = read_manifest(bundle)
    assert tuple(m["graphs"]) == get_family("pcbvlm").graph_roles
    for role, g in m["graphs"].items():
        proto = onnx.load(str(bundle / g["file"]))
        onnx.checker.check_model(proto, full_check=True)
        for values, specs in ((proto.graph.input, g["inputs"]), (proto.graph.output, g["outputs"])):
            got = [[v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]]
                   for v in values]
            assert got == [[s["name"], s["shape"]] for s in specs], role
    assert m["graphs"]["vision"]["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert m["graphs"]["decoder_step"]["outputs"][1]["shape"][4] == "past_seq + 1"


def test_parity_block(exported):
    p = read_manifest(exported[1])["parity"]
    assert p["passed"] and len(p["sizes"]) >= 2 and [128, 128] in p["sizes"]
    assert any(h != w for h, w in p["sizes"])          # a non-square size too
    assert p["boards"]["source"] in ("pcbedge/data/sample", "random")
    for graph, outputs in (("vision", 6), ("decoder_prefill", 2), ("decoder_step", 2)):
        assert len(p["graphs"][graph]) == outputs
        for err in p["graphs"][graph].values():
            assert 0 <= err["max_abs"] <= p["atol"] and err["max_rel"] >= 0
    assert p["answers"]["checked"] >= 2 and p["answers"]["identical"] == p["answers"]["checked"]


def test_vision_graph_at_new_shapes(exported, model):
    family = get_family("pcbvlm")
    sess = _session(exported[1] / "vision.onnx")
    for hw in [(64, 160), (160, 96)]:
        x = np.stack([random_pair_input(hw, seed=5), random_pair_input(hw, seed=6)])
        ref = family.reference(model, "vision", {"pixel_values": x})
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x})))
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, atol=1e-4, rtol=1e-4, err_msg=k)
        assert got["visual_tokens"].shape[1] == (hw[0] // 32) * (hw[1] // 32)


def _decode_inputs(model, seed=0, n_vis=16, t=9):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    vis = torch.randn(1, n_vis, c.text.d_model, generator=g)
    reg = torch.randn(1, c.vision.num_regions, c.text.d_model, generator=g)
    ids = torch.randint(0, c.text.vocab_size, (1, t), generator=g)   # text and pointer ids
    return vis, reg, ids


def test_kv_cache_matches_full_recompute_torch(model):
    vis, reg, ids = _decode_inputs(model)
    t0 = 4
    with torch.no_grad():
        full = model.decoder.forward_full(vis, reg, ids)
        logits, past = model.decoder.prefill(vis, reg, ids[:, :t0])
        torch.testing.assert_close(logits, full[:, t0 - 1], atol=1e-5, rtol=1e-5)
        for t in range(t0, ids.shape[1]):
            logits, past = model.decoder.step(ids[:, t:t + 1], torch.tensor([[t]]), reg, past)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)
    assert past.shape[4] == vis.shape[1] + reg.shape[1] + ids.shape[1]


def test_kv_cache_matches_full_recompute_onnx(exported, model):
    _, bundle = exported
    prefill = _session(bundle / "decoder_prefill.onnx")
    step = _session(bundle / "decoder_step.onnx")
    vis, reg, ids = _decode_inputs(model, seed=1, n_vis=11)   # pruned-like token count
    with torch.no_grad():
        full = model.decoder.forward_full(vis, reg, ids).numpy()
    t0 = 3
    logits, past = prefill.run(["logits", "present"], {
        "visual_tokens": vis.numpy(), "region_tokens": reg.numpy(),
        "input_ids": ids[:, :t0].numpy()})
    np.testing.assert_allclose(logits, full[:, t0 - 1], atol=1e-4, rtol=1e-4)
    for t in range(t0, ids.shape[1]):
        logits, past = step.run(["logits", "present"], {
            "input_ids": ids[:, t:t + 1].numpy(), "positions": np.array([[t]], np.int64),
            "region_tokens": reg.numpy(), "past": past})
        np.testing.assert_allclose(logits, full[:, t], atol=1e-4, rtol=1e-4)


def test_onnx_answers_match_torch(exported, model):
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    runner = PcbVlmOnnxRunner(exported[1])
    questions = ("where are the defects?", "how many spurs?", "is there a short?", "tell me a joke")
    for seed in range(3):
        x = random_pair_input(128, seed=10 + seed)
        enc = runner.encode(x)
        for q in questions:
            ref = model.answer(x, q)
            got = runner.answer(enc, q)
            assert got["token_ids"] == ref["token_ids"], (seed, q)
            assert got["raw"] == ref["raw"]
            assert {k: got[k] for k in ("answer", "intent", "filter", "count", "defects",
                                        "complete")} == \
                {k: ref[k] for k in ("answer", "intent", "filter", "count", "defects", "complete")}


def test_parity_raises_past_tolerance(exported, model):
    from pcbedge.families.pcbvlm.parity import check_parity
    _, bundle = exported
    m = read_manifest(bundle)
    with pytest.raises(ExportError, match="disagree with PyTorch"):
        check_parity(get_family("pcbvlm"), model, bundle, m, sizes=[(64, 64)], boards=0,
                     atol=0.0, rtol=0.0)


def _without_dynamo(monkeypatch):
    """Make the dynamo exporter fail, so the (much faster) TorchScript fallback runs."""
    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("dynamo unavailable in this test")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", no_dynamo)


def test_legacy_exporter_fallback_recorded(tmp_path, monkeypatch):
    _without_dynamo(monkeypatch)
    out = export_model(tiny_pcbvlm(tmp_path), tmp_path / "b", check_boards=0, progress=False,
                       parity_sizes=[(128, 128), (96, 64)])
    m = read_manifest(out)
    assert m["exporter"]["methods"] == ["torchscript"] and m["parity"]["passed"]
    assert "dynamo unavailable" in m["graphs"]["vision"]["fallback_reason"]


# -- refusals and atomicity ------------------------------------------------------------------

def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    model_dir = tiny_pcbvlm(tmp_path)
    with pytest.raises(OutputError, match="not empty"):
        export_model(model_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(OutputError, match="overlaps the model folder"):
        export_model(model_dir, model_dir, overwrite=True, progress=False)
    assert (model_dir / "model.safetensors").is_file()


def test_refuses_bad_model_dirs(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        export_model(tmp_path / "nope", tmp_path / "o1", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pickle"):
        export_model(pickled, tmp_path / "o2", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelError, match="(?s)unknown model family .llava.*pcbvlm"):
        export_model(other, tmp_path / "o3", progress=False)
    model_dir = tiny_pcbvlm(tmp_path)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="(?s)lacks model.safetensors.*pickle"):
        export_model(model_dir, tmp_path / "o4", progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_refuses_bad_opset(tmp_path):
    with pytest.raises(ExportError, match="opset 11"):
        export_model(tiny_pcbvlm(tmp_path), tmp_path / "o", opset=11, progress=False)


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    real = exporter.export_graph

    def fail_on_prefill(g, folder, opset):
        if g.name == "decoder_prefill":
            assert (folder / "vision.onnx").is_file()     # really mid-export
            raise ExportError("injected failure")
        return real(g, folder, opset)
    monkeypatch.setattr(exporter, "export_graph", fail_on_prefill)
    _without_dynamo(monkeypatch)
    model_dir = tiny_pcbvlm(tmp_path / "m")
    with pytest.raises(ExportError, match="injected"):
        export_model(model_dir, tmp_path / "out" / "bundle", progress=False)
    assert not (tmp_path / "out" / "bundle").exists()
    assert list((tmp_path / "out").iterdir()) == []     # no staging folder left behind


def test_sigkill_mid_export_leaves_no_manifest(tmp_path):
    model_dir = tiny_pcbvlm(tmp_path / "m")
    out = tmp_path / "out" / "bundle"
    code = ("import torch; torch.set_num_threads(1)\n"
            "from pcbedge.export.exporter import export_model\n"
            f"export_model({str(model_dir)!r}, {str(out)!r}, progress=False, check_boards=0)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any((tmp_path / "out").glob(".bundle.staging-*/vision.onnx")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert not list((tmp_path / "out").rglob("manifest.json*"))
    with pytest.raises(Exception):
        read_manifest(out)


def test_overwrite_replaces_atomically(tmp_path):
    from pcbedge.bundle.atomic import staged_dir
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "manifest.json").write_text('{"kind": "pcbedge-bundle", "schema_version": 1}')
    with pytest.raises(RuntimeError):
        with staged_dir(out, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "old.txt"]
    with staged_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
        (stage / "manifest.json.partial").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]



def test_parity_tolerates_topk_tie_order_only():
    from pcbedge.families.pcbvlm.parity import align_ties
    ref = {"s": np.array([[0.9, 0.5, 0.5 - 1e-7, 0.1]], np.float32),
           "box": np.arange(16, dtype=np.float32).reshape(1, 4, 4)}
    got = {"s": ref["s"].copy(), "box": ref["box"][:, [0, 2, 1, 3]].copy()}   # tie swapped
    aligned, moved = align_ties(got, ref, ("s", ("box",)), atol=1e-3, rtol=1e-3)
    assert moved == 2 and np.array_equal(aligned["box"], ref["box"])
    got = {"s": ref["s"].copy(), "box": ref["box"][:, [1, 0, 2, 3]].copy()}   # not a tie
    aligned, moved = align_ties(got, ref, ("s", ("box",)), atol=1e-3, rtol=1e-3)
    assert moved == 0 and not np.array_equal(aligned["box"], ref["box"])


def test_flip_average_exports_and_matches_torch(tmp_path):
    """The flip-averaged heatmap (VisionConfig.flip_average) is in the vision graph: export's
    parity check passes and the ONNX answers equal the PyTorch ones."""
    from dataclasses import replace

    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm_model
    m = tiny_pcbvlm_model()
    m.cfg = replace(m.cfg, vision=replace(m.cfg.vision, flip_average=True))
    m.vision.cfg = m.cfg
    m.save_pretrained(tmp_path / "m")
    model = PcbVlm.from_pretrained(tmp_path / "m")
    assert model.cfg.vision.flip_average
    x = torch.from_numpy(random_pair_input(128, seed=3))[None]
    with torch.no_grad():   # the heatmap is the mean of the two views' probabilities
        _, _, h0, _ = model.vision.dense(x)
        _, _, h1, _ = model.vision.dense(x.flip(3))
        _, _, avg, _ = model.vision.dense_averaged(x)
        want = (torch.sigmoid(h0) + torch.sigmoid(h1).flip(3)) / 2
        torch.testing.assert_close(torch.sigmoid(avg), want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(torch.sigmoid(h0), want, atol=1e-3)
    export_model(tmp_path / "m", tmp_path / "b")
    runner = PcbVlmOnnxRunner(tmp_path / "b")
    for seed in range(2):
        xs = random_pair_input(128, seed=20 + seed)
        enc = runner.encode(xs)
        for q in ("where are the defects?", "how many spurs?"):
            ref, got = model.answer(xs, q), runner.answer(enc, q)
            assert got["token_ids"] == ref["token_ids"] and got["defects"] == ref["defects"]
