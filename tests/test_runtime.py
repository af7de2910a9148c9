"""The ONNX runner (torch-free), the manifest checks it relies on, and token pruning."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcbedge.errors import (BundleError, HardwareMismatchError, ModelError, QuestionError,
                            TargetError)
from pcbedge.bundle.manifest import (SCHEMA_VERSION, read_manifest, sha256_file, verify_files,
                                     write_manifest)
from pcbedge.runtime import MAX_QUESTION_CHARS, load_runner
from pcbedge.runtime.pruning import TokenPruningConfig, select_tokens, token_budget
from pcbedge.testing import random_pair_input, tiny_bundle, write_pair_images

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ANSWER_KEYS = {"answer", "intent", "filter", "types", "scope", "scope_args", "order", "count",
               "defects", "complete", "raw", "token_ids", "latency_ms", "info",
               "image_quality"}   # image_quality: asked from image files
LATENCY_KEYS = {"preprocess", "vision", "prefill", "decode", "total"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")


@pytest.fixture(scope="module")
def runner(exported):
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    return PcbVlmOnnxRunner(exported[1], threads=1)


@pytest.fixture
def bundle_copy(exported, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(exported[1], dst)
    return dst


# -- manifest ---------------------------------------------------------------------------------

def test_manifest_round_trip(bundle_copy, tmp_path):
    m = read_manifest(bundle_copy)
    out = tmp_path / "again"
    out.mkdir()
    write_manifest(out, m)
    assert read_manifest(out) == m
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    with pytest.raises(BundleError, match="lacks the fields"):
        write_manifest(out, {k: v for k, v in m.items() if k != "kv_cache"})


def test_newer_schema_refused(bundle_copy):
    m = read_manifest(bundle_copy)
    m["schema_version"] = SCHEMA_VERSION + 1
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=f"(?s)schema_version {SCHEMA_VERSION + 1}.*"
                                          f"version {SCHEMA_VERSION}.*upgrade pcbedge"):
        read_manifest(bundle_copy)


def test_bad_manifests_refused(bundle_copy):
    path = bundle_copy / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle_copy)
    path.write_text(json.dumps({k: v for k, v in m.items() if k != "answer"}))
    with pytest.raises(BundleError, match="lacks the fields.*answer"):
        read_manifest(bundle_copy)
    path.unlink()
    with pytest.raises(BundleError, match="incomplete.*interrupted"):
        read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="incomplete"):
        load_runner(bundle_copy)


def test_tampered_graph_refused(bundle_copy):
    p = bundle_copy / "decoder_step.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder_step.onnx.*sha256"):
        load_runner(bundle_copy)
    p.unlink()
    with pytest.raises(BundleError, match="lacks decoder_step.onnx"):
        verify_files(bundle_copy, read_manifest(bundle_copy))


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "a/../../x"])
def test_escaping_file_paths_refused(bundle_copy, bad):
    m = read_manifest(bundle_copy)
    m["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(BundleError, match="escapes the bundle"):
        verify_files(bundle_copy, m)
    m = read_manifest(bundle_copy)
    m["tokenizer"] = bad
    with pytest.raises(BundleError, match="escapes the bundle"):
        verify_files(bundle_copy, m)


def _graph_with_external_data(path: Path, location: str) -> None:
    import onnx
    from onnx import TensorProto, helper
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize("location", ["../outside.bin", "/tmp/outside.bin"])
def test_external_data_outside_bundle_refused(bundle_copy, location):
    (bundle_copy.parent / "outside.bin").write_bytes(b"\0" * 16)
    p = bundle_copy / "vision.onnx"
    _graph_with_external_data(p, location)
    m = read_manifest(bundle_copy)
    m["files"]["vision.onnx"] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="external data of vision.onnx"):
        load_runner(bundle_copy)


# -- runner ----------------------------------------------------------------------------------

def test_ask_imports_no_torch(exported, tmp_path):
    test_img, temp_img = write_pair_images(tmp_path)
    code = (
        "import json, sys\n"
        "from pcbedge.runtime import load_runner\n"
        f"r = load_runner({str(exported[1])!r}, threads=1)\n"
        f"a = r.ask({str(test_img)!r}, {str(temp_img)!r}, 'where are the defects?')\n"
        "torch = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(json.dumps({'torch': torch, 'runner': type(r).__name__, 'keys': sorted(a)}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] == [] and res["runner"] == "PcbVlmOnnxRunner"
    assert set(res["keys"]) == ANSWER_KEYS


@pytest.mark.covers("pcbvlm", "ask")
@pytest.mark.covers("pcbvlm", "ask_model")
def test_ask_matches_torch_runner(exported, runner, tmp_path):
    from pcbedge.families.pcbvlm.torch_runner import PcbVlmTorchRunner
    size = (200, 150)
    test_img, temp_img = write_pair_images(tmp_path, size=size)
    ref_runner = load_runner(exported[0])
    assert isinstance(ref_runner, PcbVlmTorchRunner)
    for q in ("where are the defects?", "how many opens?", "what time is it"):
        got = runner.ask(test_img, temp_img, q)
        ref = ref_runner.ask(test_img, temp_img, q)
        assert set(got) == ANSWER_KEYS and set(ref) == ANSWER_KEYS
        assert got["token_ids"] == ref["token_ids"] and got["defects"] == ref["defects"]
        assert got["image_quality"] == ref["image_quality"]
        assert set(got["latency_ms"]) == LATENCY_KEYS == set(ref["latency_ms"])
        assert got["latency_ms"]["total"] >= got["latency_ms"]["decode"] >= 0
        assert got["info"]["visual_tokens_kept"] == got["info"]["visual_tokens_total"] == 16
        for d in got["defects"]:          # boxes are in original pixels
            x1, y1, x2, y2 = d["bbox"]
            assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]
        assert got["raw"].split()[0].startswith("<q_")


def test_encode_once_many_questions(runner):
    x = random_pair_input(128, seed=4)
    enc = runner.encode(x)
    answers = [runner.answer(enc, q) for q in ("where are the defects?", "any spurs?")]
    again = runner.answer(runner.encode(x), "where are the defects?")
    assert answers[0]["token_ids"] == again["token_ids"]
    assert all(a["latency_ms"]["vision"] == enc.vision_ms for a in answers)


@pytest.mark.parametrize("q", ["", "   ", None, 5, "x" * (MAX_QUESTION_CHARS + 1)])
def test_bad_questions_refused(runner, q):
    with pytest.raises(QuestionError) as e:
        runner.answer(runner.encode(random_pair_input(128)), q)
    assert e.value.exit_code == QuestionError.exit_code == 13


def test_question_limit_matches_tokenizer():
    from pcbedge.families.pcbvlm.tokenizer import MAX_QUESTION_CHARS as TOKENIZER_LIMIT
    assert MAX_QUESTION_CHARS == TOKENIZER_LIMIT


def test_unavailable_provider_refused(exported):
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    with pytest.raises(HardwareMismatchError, match="(?s)TensorrtExecutionProvider.*"
                                                    "CPUExecutionProvider"):
        PcbVlmOnnxRunner(exported[1], providers=["TensorrtExecutionProvider"])
    with pytest.raises(TargetError, match="threads"):
        PcbVlmOnnxRunner(exported[1], threads=0)


def test_runtime_block_of_manifest_used(bundle_copy):
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    m = read_manifest(bundle_copy)
    m["runtime"].update(threads=1, inter_op_threads=1, execution_mode="sequential",
                        graph_optimization_level="ORT_ENABLE_EXTENDED")
    write_manifest(bundle_copy, m)
    r = PcbVlmOnnxRunner(bundle_copy)
    assert r.threads == 1 and r.providers == ["CPUExecutionProvider"]
    m["runtime"]["spin_wait"] = "whenever"
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="spin_wait 'whenever'"):
        PcbVlmOnnxRunner(bundle_copy)
    m["runtime"] = {"engine": "tensorrt", "providers": [], "threads": None}
    write_manifest(bundle_copy, m)
    with pytest.raises(HardwareMismatchError, match="'tensorrt' runtime"):
        PcbVlmOnnxRunner(bundle_copy)
    assert PcbVlmOnnxRunner(bundle_copy, providers=["CPUExecutionProvider"]).sessions


def test_spin_wait_becomes_session_config():
    """The manifest's spin_wait names onnxruntime session config entries; a bundle that does
    not say gets "during_run" (threads stop spinning when a Run returns)."""
    from pcbedge.runtime import sessions
    from pcbedge.runtime.sessions import session_options as _session_options
    from pcbedge.targets import profile
    # the profile's choices are the sessions', one default (the profile's) for both
    assert tuple(sessions.SPIN_WAIT) == profile.SPIN_WAITS
    stop, allow = "session.force_spinning_stop", "session.intra_op.allow_spinning"
    default = _session_options({}, 1)
    assert default.get_session_config_entry(stop) == "1"
    never = _session_options({"spin_wait": "never"}, 1)
    assert never.get_session_config_entry(allow) == "0"
    always = _session_options({"spin_wait": "always"}, 1)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        always.get_session_config_entry(stop)


def test_load_runner_dispatch(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_runner(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a bundle"):
        load_runner(tmp_path / "empty")


# -- pruning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"method": "random"}, "none, model_prior, template_diff"),
    ({"method": "model_prior", "keep_ratio": 0.0}, r"outside \(0, 1\]"),
    ({"method": "model_prior", "keep_ratio": 1.5}, r"outside \(0, 1\]"),
    ({"method": "model_prior", "keep_ratio": float("nan")}, r"outside \(0, 1\]"),
    ({"method": "model_prior", "min_tokens": 0}, "positive integer"),
])
def test_pruning_config_validation(kw, match):
    with pytest.raises(TargetError, match=match):
        TokenPruningConfig(**kw)


def test_pruning_config_round_trip():
    cfg = TokenPruningConfig("template_diff", 0.3, 8)
    assert TokenPruningConfig.from_dict(cfg.to_dict()) == cfg
    assert TokenPruningConfig.from_dict(None) == TokenPruningConfig()
    with pytest.raises(TargetError, match="unknown fields"):
        TokenPruningConfig.from_dict({"method": "none", "ratio": 0.5})


def test_select_tokens_budget_and_order():
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    cfg = TokenPruningConfig("model_prior", keep_ratio=0.25, min_tokens=16)
    keep = select_tokens(scores, cfg)
    assert keep.dtype == np.int64 and len(keep) == token_budget(400, cfg) == 100
    assert np.all(np.diff(keep) > 0)                                   # ascending positions
    assert set(keep) == set(np.argsort(-scores)[:100])                 # the best scores
    assert len(select_tokens(scores[:40], cfg)) == 16                  # min_tokens floor
    assert len(select_tokens(scores[:10], cfg)) == 10                  # never more than N
    assert np.array_equal(select_tokens(scores[:7], TokenPruningConfig()), np.arange(7))
    assert token_budget(10, TokenPruningConfig("model_prior", 0.3, 1)) == 3


def test_runner_pruning_matches_torch(exported, runner):
    from pcbedge.families.pcbvlm.torch_runner import PcbVlmTorchRunner
    cfg = TokenPruningConfig("model_prior", keep_ratio=0.5, min_tokens=4)
    ref_runner = PcbVlmTorchRunner(exported[0], pruning=cfg)
    x = random_pair_input(128, seed=7)
    enc = runner.encode(x)
    expect = select_tokens(enc.outputs["token_prior"][0], cfg)
    assert len(expect) == 8
    for q in ("where are the defects?", "is there a short?"):
        got = runner.answer(enc, q, pruning=cfg)
        ref = ref_runner.answer(ref_runner.encode(x), q)
        assert got["info"]["visual_tokens_kept"] == 8 == ref["info"]["visual_tokens_kept"]
        assert got["info"]["visual_tokens_total"] == 16
        assert got["token_ids"] == ref["token_ids"]


def test_manifest_pruning_block_used(bundle_copy):
    m = read_manifest(bundle_copy)
    m["pruning"] = TokenPruningConfig("template_diff", 0.25, 2).to_dict()
    write_manifest(bundle_copy, m)
    r = load_runner(bundle_copy)
    a = r.answer(r.encode(random_pair_input(128, seed=2)), "where are the defects?")
    assert a["info"]["visual_tokens_kept"] == 4
    assert a["info"]["pruning"]["method"] == "template_diff"
    none = r.answer(r.encode(random_pair_input(128, seed=2)), "where?", pruning={"method": "none"})
    assert none["info"]["visual_tokens_kept"] == 16
