"""Qwen2-VL and Qwen2.5-VL through every verb: export -> build (every shipped target; TensorRT
as far as a host without TensorRT goes) -> bench (gates, report) -> ask, and ask --model; the
checkpoint's own chat template (no system turn, a custom system prompt) gives the same greedy
tokens as transformers' processor + ``generate`` (tiny random-weight models, no downloads)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from pcbedge import api  # noqa: E402
from pcbedge.bundle.manifest import read_manifest, verify_files  # noqa: E402
from pcbedge.families.qwen_vl.parity import random_board  # noqa: E402
from pcbedge.families.qwen_vl.templates import NO_SYSTEM_TEMPLATE, QWEN2_VL_TEMPLATE  # noqa
from pcbedge.targets import load_target, shipped_names  # noqa: E402
from pcbedge.families.qwen_vl.testing import (QWEN_PREPROCESSOR, tiny_qwen2_vl,  # noqa: E402
                                              tiny_qwen2_vl_model)

torch.set_num_threads(1)
VARIANTS = ("qwen2_vl", "qwen2_5_vl")
Q = "where are the defects?"
OPEN_GATES = {"p95_ms_max": 1e9, "max_map_drop": 1.0, "max_count_drop": 1.0,
              "max_hallucination_rise": 1e9, "min_map": 0.0}
CUSTOM_SYSTEM = QWEN2_VL_TEMPLATE.replace("You are a helpful assistant.",
                                          "You inspect printed circuit boards.")


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = tiny_qwen2_vl(root, request.param)
    export = api.export_model(model_dir, root / "export", check_boards=0,
                              parity_sizes=[(56, 84)], progress=False)
    return request.param, model_dir, export, root


@pytest.mark.covers(["qwen2_vl", "qwen2_5_vl"], "export")
@pytest.mark.covers(["qwen2_vl", "qwen2_5_vl"], "build", "*")
def test_build_every_target(qwen):
    name, _, export, root = qwen
    for target in shipped_names():
        out = api.build_bundle(target, export, root / target, progress=False)
        m = read_manifest(out)
        verify_files(out, m)
        want = load_target(target).for_family("qwen_vl")
        assert m["precision"] == {"vision": want.precision.vision,
                                  "decoder": want.precision.decoder}
        assert m["build"]["profile_family_overrides"] == "qwen_vl"
        assert m["pruning"]["method"] == want.pruning.method
        q = m["quantization"] or {"graphs": {}}
        assert "embed" not in q["graphs"]          # a Gather: stays FP32
        if want.precision.decoder in ("int4", "int8"):
            import onnx
            ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
            assert {"int4": "MatMulNBits", "int8": "MatMulInteger"}[want.precision.decoder] in ops
            assert "Gemm" not in ops        # the LM head (a Gemm) is quantized too
            drift = q["groups"]["decoder"]["drift_vs_fp32"]
            assert 0 <= drift["first_logits_rel_l2"] < 0.5
        if want.precision.vision == "int8":
            assert q["graphs"]["vision"]["placement"]["quantized_nodes"]
        if want.runtime == "tensorrt":
            # no TensorRT here: engines deferred with their shapes and build script
            assert m["tensorrt"]["engines"].startswith("deferred")
            plan = json.loads((out / "trt" / "profiles.json").read_text())
            assert plan["graphs"]["decoder"]["flags"] == ["fp16"]
            assert m["trt_validation"]["blockers"] == 0


@pytest.mark.covers(["qwen2_vl", "qwen2_5_vl"], "bench")
@pytest.mark.covers(["qwen2_vl", "qwen2_5_vl"], "ask")
def test_bench_and_ask_the_x86_bundle(qwen, tmp_path):
    name, _, export, root = qwen
    bundle = root / "x86-cpu"
    if not (bundle / "manifest.json").is_file():
        api.build_bundle("x86-cpu", export, bundle, progress=False)
    report = api.run_benchmark(bundle, out_dir=tmp_path / "bench", gates=OPEN_GATES, queries=3,
                               min_seconds=0.0, warmup=0, max_boards=2, progress=False)
    assert report["passed"] and report["drift"]["available"]
    assert set(report["latency_ms_by_stage"]) >= {"preprocess", "vision", "prefill", "decode"}
    assert set(report["gates"]) >= {"p95_ms_max", "max_map_drop", "min_map"}
    assert (tmp_path / "bench" / "report.html").is_file()
    runner = api.load_runner(bundle, threads=1)
    ans = runner.ask(random_board(224, 224, seed=1), random_board(224, 224, seed=2), Q,
                     max_new_tokens=6)
    assert ans["info"]["visual_tokens_kept"] < ans["info"]["visual_tokens_total"]  # pruned
    assert 1 <= len(ans["token_ids"]) <= 6


@pytest.mark.covers(["qwen2_vl", "qwen2_5_vl"], "ask_model")
def test_ask_model_equals_the_export(qwen):
    from click.testing import CliRunner

    from pcbedge.cli import cli
    name, model_dir, export, root = qwen
    img = random_board(60, 90, seed=3)
    ref = api.load_runner(model_dir).ask(img, None, Q, max_new_tokens=8)
    got = api.load_runner(export, threads=1).ask(img, None, Q, max_new_tokens=8)
    assert ref["token_ids"] == got["token_ids"] and ref["info"]["engine"] == "torch"
    from PIL import Image
    Image.fromarray(img).save(root / "board.png")
    res = CliRunner().invoke(cli, ["ask", "--model", str(model_dir), "--image",
                                   str(root / "board.png"), "--max-new-tokens", "4", "--json", Q])
    assert res.exit_code == 0, res.output
    assert "token_ids" in json.loads(res.output[:res.output.rindex("}") + 1])


def _transformers_tokens(model_dir, template: str, img: np.ndarray, n: int) -> list[int]:
    """transformers' own path: its tokenizer renders the chat template, its image processor
    makes the patches, the image placeholder is expanded as Qwen2VLProcessor does (one token
    per merged patch), ``generate`` decodes greedily."""
    from transformers import (AutoModelForImageTextToText, Qwen2TokenizerFast,
                              Qwen2VLImageProcessor)

    from pcbedge.families.qwen_vl.testing import tiny_qwen_tokenizer
    tok = Qwen2TokenizerFast(tokenizer_object=tiny_qwen_tokenizer())
    proc_cfg = {k: v for k, v in QWEN_PREPROCESSOR.items() if k != "image_processor_type"}
    pix = Qwen2VLImageProcessor(**proc_cfg)(images=[img], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=True)
    n_img = int(pix["image_grid_thw"][0].prod()) // 4
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pix["pixel_values"],
                             image_grid_thw=pix["image_grid_thw"], max_new_tokens=n,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("template", [NO_SYSTEM_TEMPLATE, CUSTOM_SYSTEM],
                         ids=["no-system-turn", "custom-system-prompt"])
def test_the_checkpoints_own_chat_template(template, tmp_path):
    model_dir = tiny_qwen2_vl(tmp_path, "qwen2_vl", chat_template=template, seed=1)
    export = api.export_model(model_dir, tmp_path / "export", check_boards=0,
                              parity_sizes=[(56, 84)], progress=False)
    assert (export / "chat_template.jinja").read_text() == template
    img = random_board(60, 90, seed=11)
    ans = api.load_runner(export, threads=1).ask(img, None, Q, max_new_tokens=24)
    ref = _transformers_tokens(model_dir, template, img, 24)
    assert ans["token_ids"] == ref and len(ref) >= 20
    raw = api.load_runner(export, threads=1)
    text = raw.prompt(Q, raw.prepare(img).inputs)
    prompt = raw.tokenizer.decode(text, skip_special_tokens=False)
    if template is NO_SYSTEM_TEMPLATE:
        assert "system" not in prompt
    else:
        assert "You inspect printed circuit boards." in prompt


def test_a_checkpoint_without_chat_template_is_refused(tmp_path):
    from pcbedge.errors import ModelError
    model_dir = tiny_qwen2_vl(tmp_path, "qwen2_vl")
    (model_dir / "chat_template.jinja").unlink()
    with pytest.raises(ModelError, match="no chat template"):
        api.export_model(model_dir, tmp_path / "export", progress=False)


def test_tiny_model_fixture_is_deterministic():
    a, _ = tiny_qwen2_vl_model("qwen2_vl", seed=3)
    b, _ = tiny_qwen2_vl_model("qwen2_vl", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["answer"].update(image_token_id=m["vocab"]["logits"]), "answer.image_token_id"),
    (lambda m: m["vision"].update(patch_size=0), "vision.patch_size"),
    (lambda m: m["vision"].update(spatial_merge_size=3), "size_multiple"),
    (lambda m: m["answer"].update(eos_token_ids=[]), "answer.eos_token_ids"),
], ids=["image-token-past-vocab", "patch-size-0", "merge-off-stride", "no-eos"])
def test_the_familys_own_manifest_fields_are_checked(qwen, tmp_path, edit, field):
    """The qwen_vl schema role: a bad family field is a BundleError naming it, at open."""
    import shutil

    from pcbedge.errors import BundleError
    bundle = shutil.copytree(qwen[2], tmp_path / "b")
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=field.replace(".", r"\.").replace("[", r"\[")):
        api.load_runner(bundle, threads=1)
