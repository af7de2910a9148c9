"""Export of the Qwen2-VL and Qwen2.5-VL families: numpy host side vs transformers, graphs vs
PyTorch, greedy generation vs ``generate``, visual-token pruning (tiny random models)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from pcbedge.errors import BundleError, InputImageError, TargetError  # noqa: E402
from pcbedge.export.exporter import export_model  # noqa: E402
from pcbedge.families import get_family  # noqa: E402
from pcbedge.families.qwen_vl.parity import random_board  # noqa: E402
from pcbedge.bundle.manifest import read_manifest, sha256_file  # noqa: E402
from pcbedge.runtime import load_runner  # noqa: E402
from pcbedge.families.qwen_vl import preprocess as qp  # noqa: E402
from pcbedge.families.qwen_vl.testing import QWEN_PREPROCESSOR, tiny_qwen2_vl  # noqa: E402

torch.set_num_threads(1)
VARIANTS = ("qwen2_vl", "qwen2_5_vl")
# raw image sizes (h, w) that resize to the 56x84 and 112x112 grids, and one over max_pixels
SIZES = ((60, 90), (115, 120))
NEW_TOKENS = 24
Q = "where are the defects?"


@pytest.fixture(scope="module", params=VARIANTS)
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = tiny_qwen2_vl(root, request.param)
    bundle = export_model(model_dir, root / "bundle", check_boards=0,
                          parity_sizes=[(56, 84), (112, 112)], progress=False)
    family = get_family(request.param)
    return family, family.load_model(model_dir), model_dir, bundle


@pytest.fixture(scope="module")
def runner(exported):
    return load_runner(exported[3], threads=1)


def _reference_ids(model, ids, enc, n=NEW_TOKENS):
    from pcbedge.families.qwen_vl.export import generate_reference
    return generate_reference(model, ids, enc.prepared.inputs, n)


def _encode(runner, img, question=Q, template=None):
    """(encoded images, prompt ids) of one question."""
    enc = runner.encode(runner.prepare(img, template))
    return enc, runner.prompt(question, enc.prepared.inputs)


def _positions(runner, ids, enc):
    return qp.rope_index(ids, enc.prepared.inputs.grids, image_token_id=runner.image_token_id,
                         merge=runner.recipe.merge_size)


def test_bundle_layout_and_manifest(exported):
    family, _, model_dir, bundle = exported
    m = read_manifest(bundle)
    assert sorted(p.name for p in bundle.iterdir()) == [
        "chat_template.jinja", "decoder.onnx", "embed.onnx", "manifest.json", "tokenizer.json",
        "vision.onnx"]
    assert m["family"] == family.name and m["assets"] == {"chat_template": "chat_template.jinja"}
    assert m["graph_groups"] == {"vision": ["vision"], "decoder": ["decoder"]}
    # the export order: the decoder first, the small embedding last (export.graphs)
    assert tuple(m["graphs"]) == family.graph_roles == ("decoder", "vision", "embed")
    assert all(g["exporter"] == "dynamo" and g["opset"] >= 18 for g in m["graphs"].values())
    assert m["source_model"]["sha256"] == sha256_file(model_dir / "model.safetensors")
    assert m["parity"]["passed"] and m["parity"]["answers"]["identical"] == 4
    assert m["parity"]["rope_index"]["mismatches"] == []
    assert m["kv_cache"]["layout"][3] == "kv_head" and m["kv_cache"]["num_layers"] == 2
    assert m["answer"]["box_coordinates"] == ("norm1000" if family.name == "qwen2_vl"
                                              else "resized_pixels")
    assert m["graphs"]["decoder"]["outputs"][1]["shape"][4] == "past_seq + seq"
    assert m["vision"]["windowed"] is (family.name == "qwen2_5_vl")


@pytest.mark.parametrize("size", [*SIZES, (470, 500), (30, 29)])
def test_numpy_preprocess_equals_image_processor(size):
    from transformers import Qwen2VLImageProcessor
    cfg = {k: v for k, v in QWEN_PREPROCESSOR.items() if k != "image_processor_type"}
    proc = Qwen2VLImageProcessor(**cfg)
    img = random_board(*size, seed=size[0])
    px, grid = qp.preprocess_image(img, qp.ImageRecipe.from_config(QWEN_PREPROCESSOR))
    ref = proc(images=[img], return_tensors="np")
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(px, ref["pixel_values"], atol=1e-6, rtol=0)


def test_resized_grids():
    r = qp.ImageRecipe.from_config(QWEN_PREPROCESSOR)
    assert [qp.preprocess_image(random_board(*s, seed=0), r)[1].tolist() for s in SIZES] == [
        [1, 4, 6], [1, 8, 8]]
    with pytest.raises(InputImageError, match="aspect ratio"):
        qp.smart_resize(2, 1000, 28, r.min_pixels, r.max_pixels)
    with pytest.raises(InputImageError, match="uint8 RGB"):
        qp.preprocess_image(np.zeros((56, 56), np.float32), r)


@pytest.mark.parametrize("template", [False, True])
def test_positions_equal_get_rope_index(exported, runner, template):
    _, model, _, _ = exported
    for size in SIZES:
        img = random_board(*size, seed=1)
        enc, ids = _encode(runner, img, Q, img[::-1].copy() if template else None)
        grids = enc.prepared.inputs.grids
        with torch.no_grad():
            ref, _ = model.model.get_rope_index(torch.tensor([ids]),
                                                image_grid_thw=torch.tensor(grids))
        np.testing.assert_array_equal(_positions(runner, ids, enc), ref[:, 0].numpy())


def test_graphs_match_pytorch(exported, runner):
    family, model, _, _ = exported
    img = random_board(112, 112, seed=3)
    enc, prompt_ids = _encode(runner, img, Q, random_board(*SIZES[0], seed=4))
    images = enc.prepared.inputs
    ref = family.reference(model, "vision", {"pixel_values": images.pixel_values,
                                             "grid_thw": np.asarray(images.grids)})
    np.testing.assert_allclose(np.concatenate(enc.outputs), ref["image_embeds"],
                               atol=1e-5, rtol=1e-4)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.from_numpy(images.pixel_values),
                       image_grid_thw=torch.tensor(images.grids)).logits[0, -1].numpy()
    embeds, pos, _, _ = runner.prefill_inputs(prompt_ids, enc, runner.pruning)
    got, present = runner.sessions["decoder"].run(
        None, {"inputs_embeds": embeds, "position_ids": pos,
               "past": np.zeros(runner.kv_shape, np.float32)})
    np.testing.assert_allclose(got[0], logits, atol=1e-4, rtol=1e-3)
    assert present.shape[4] == len(prompt_ids)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_greedy_generation_equals_transformers(exported, runner, size, use_cache):
    _, model, _, _ = exported
    enc, ids = _encode(runner, random_board(*size, seed=5))
    got = runner.generate(ids, enc, max_new_tokens=NEW_TOKENS, use_cache=use_cache)
    # the reference is always transformers' cached generate: without a cache it re-reads the
    # whole sequence each step and breaks when a random model emits <|image_pad|> itself
    ref = _reference_ids(model, ids, enc)
    assert got["token_ids"] == ref
    assert len(ref) >= 20


def test_ask_answer_json(runner):
    ans = runner.ask(random_board(60, 90, seed=6), None, Q, max_new_tokens=NEW_TOKENS)
    assert {"answer", "count", "defects", "complete", "raw", "token_ids", "latency_ms",
            "info"} <= set(ans)
    assert set(ans["latency_ms"]) == {"preprocess", "vision", "prefill", "decode", "total"}
    assert ans["info"]["visual_tokens_total"] == 6 and ans["info"]["new_tokens"] > 0
    # a random model's reply does not parse: reported as such, never as a defect
    if ans.get("parse_error"):
        assert ans["count"] == 0 and ans["defects"] == []
    assert json.loads(json.dumps(ans)) == ans


def test_pruning_keeps_positions_and_shortens_prefill(runner):
    enc, ids = _encode(runner, random_board(112, 112, seed=7))
    full = _positions(runner, ids, enc)
    cfg = {"method": "feature_norm", "keep_ratio": 0.5, "min_tokens": 1}
    embeds, pos, nxt, keep = runner.prefill_inputs(ids, enc, runner.pruning.__class__(**cfg))
    image = np.asarray(ids) == runner.image_token_id
    assert image.sum() == 16 and (keep & image).sum() == 8 and keep[~image].all()
    np.testing.assert_array_equal(pos[:, 0], full[:, keep])
    assert embeds.shape[1] == len(ids) - 8 and nxt == full.max() + 1
    kept = keep[image]
    norms = np.linalg.norm(enc.outputs[0], axis=-1)
    assert norms[kept].min() >= norms[~kept].max()
    ans = runner.generate(ids, enc, max_new_tokens=8, pruning=cfg)
    assert ans["prefill_len"] == len(ids) - 8 and len(ans["token_ids"]) >= 1
    assert ans["visual_tokens_kept"] == 8 and ans["visual_tokens_total"] == 16


def test_template_diff_pruning(runner):
    img = random_board(112, 112, seed=8)
    tmpl = img.copy()
    tmpl[60:90, 60:90] = 0
    cfg = {"method": "template_diff", "keep_ratio": 0.25, "min_tokens": 1}
    ans = runner.ask(img, tmpl, Q, max_new_tokens=4, pruning=cfg)
    assert ans["info"]["visual_tokens_total"] == 32 and ans["info"]["visual_tokens_kept"] == 8
    with pytest.raises(TargetError, match="template"):
        runner.ask(img, None, Q, max_new_tokens=2, pruning=cfg)


def test_unknown_answer_parser_is_refused(exported, tmp_path):
    import shutil

    from pcbedge.bundle.manifest import list_files
    bundle = tmp_path / "b"
    shutil.copytree(exported[3], bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["answer"]["parser"] = "qwen9"
    m["files"] = list_files(bundle)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="parser 'qwen9'"):
        load_runner(bundle)


def test_cli_ask_without_template(exported, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from pcbedge.cli import cli
    img = tmp_path / "board.png"
    Image.fromarray(random_board(60, 90, seed=9)).save(img)
    res = CliRunner().invoke(cli, ["ask", str(exported[3]), "--image", str(img), "--json",
                                   "--max-new-tokens", "5", "--show", str(tmp_path / "o.png"),
                                   Q])
    assert res.exit_code == 0, res.output
    ans = json.loads(res.output[:res.output.rindex("}") + 1])
    assert len(ans["token_ids"]) <= 5 and "raw" in ans and (tmp_path / "o.png").is_file()


def test_bad_inputs_are_typed_errors(runner, tmp_path):
    from pcbedge.errors import PcbEdgeError, QuestionError
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputImageError, match="cannot read"):
        runner.ask(bad, None, Q)
    with pytest.raises(InputImageError, match="uint8 RGB"):
        runner.ask(np.zeros((60, 90, 4), np.uint8), None, Q)
    with pytest.raises(QuestionError, match="empty"):
        runner.ask(random_board(60, 90, seed=1), None, "  ")
    with pytest.raises(QuestionError, match="special token"):
        runner.ask(random_board(60, 90, seed=1), None, "where? <|image_pad|>")
    with pytest.raises(PcbEdgeError, match="max_new_tokens"):
        runner.ask(random_board(60, 90, seed=1), None, Q, max_new_tokens=0)
    with pytest.raises(TargetError, match="keep_ratio"):
        runner.ask(random_board(60, 90, seed=1), None, Q, pruning={"method": "feature_norm",
                                                                   "keep_ratio": 1.5})


def test_unsupported_preprocessor_config_is_refused(tmp_path):
    from pcbedge.errors import ModelError
    from pcbedge.families.qwen_vl.export import read_recipe
    p = tmp_path / "preprocessor_config.json"
    p.write_text(json.dumps({**QWEN_PREPROCESSOR, "resample": 2}))
    with pytest.raises(ModelError, match="resample"):
        read_recipe(p)
    p.write_text("[1")
    with pytest.raises(ModelError, match="cannot read"):
        read_recipe(p)
    p.write_text(json.dumps({"size": {"shortest_edge": 100, "longest_edge": 2000}}))
    r = read_recipe(p)
    assert (r.min_pixels, r.max_pixels, r.patch_size) == (100, 2000, 14)
