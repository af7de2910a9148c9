"""Export precision (``pcbedge export --precision``): fp16 graphs behind float32 I/O, checked
against PyTorch in float32; the build widening them back to float32 (streamed, every fp16 tensor
kind); bf16 unchecked and refused by the build; typed refusals (tiny random models)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pcbedge.bundle.graph_io import weight_bytes  # noqa: E402
from pcbedge.bundle.manifest import read_manifest  # noqa: E402
from pcbedge.cli import cli  # noqa: E402
from pcbedge.errors import BundleError, ExportError  # noqa: E402
from pcbedge.export.exporter import export_model  # noqa: E402
from pcbedge.export.precision import PRECISIONS  # noqa: E402
from pcbedge.families import DEFAULT_FAMILY, FAMILIES, get_family  # noqa: E402
from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl  # noqa: E402
from pcbedge.recipes.build import build_bundle  # noqa: E402
from pcbedge.recipes.widen import widen_graph  # noqa: E402
from pcbedge.runtime import load_runner  # noqa: E402

torch.set_num_threads(1)
SIZES = [(56, 84)]


def _tensors(path):
    """Every initializer of a graph (weights not loaded): {name: element type}."""
    m = onnx.load(str(path), load_external_data=False)
    return {t.name: t.data_type for t in m.graph.initializer}


def _float32_weights(path) -> int:
    """Elements of the largest float32 initializer."""
    m = onnx.load(str(path), load_external_data=False)
    return max([int(np.prod(t.dims)) for t in m.graph.initializer
                if t.data_type == TensorProto.FLOAT] or [0])


def _float16_anywhere(path) -> bool:
    m = onnx.load(str(path))
    values = (*m.graph.input, *m.graph.output, *m.graph.value_info)
    return (any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)
            or any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in values)
            or any(a.name == "to" and a.i == TensorProto.FLOAT16
                   for n in m.graph.node if n.op_type == "Cast" for a in n.attribute))


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    model_dir = tiny_qwen2_vl(root, "qwen2_vl")
    out = export_model(model_dir, root / "export", precision="fp16", check_boards=1,
                       parity_sizes=SIZES, progress=False)
    return model_dir, out


def test_fp16_export_holds_fp16_weights_behind_float32_io(fp16_export):
    model_dir, out = fp16_export
    m = read_manifest(out)
    assert m["export_precision"] == "fp16"
    assert m["precision"] == {"vision": "fp16", "decoder": "fp16"}
    assert m["parity"]["passed"] and (m["parity"]["atol"], m["parity"]["rtol"]) == (0.02, 0.02)
    assert m["parity"]["answers"]["identical"] == m["parity"]["answers"]["checked"] > 0
    for g in m["graphs"].values():
        types = _tensors(out / g["file"])
        assert TensorProto.FLOAT16 in types.values()
        # every weight went fp16; small tables transformers keeps float32 (rotary inverse
        # frequencies) stay so
        assert _float32_weights(out / g["file"]) <= 64
        graph = onnx.load(str(out / g["file"]), load_external_data=False).graph
        for v in (*graph.input, *graph.output):             # the contract stays float32
            assert v.type.tensor_type.elem_type != TensorProto.FLOAT16
    model = get_family("qwen2_vl").load_model(model_dir)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(weight_bytes(onnx.load(str(out / g["file"])))
                  for g in m["graphs"].values())
    assert 1.8 * params < weights < 2.4 * params       # ~2 bytes a parameter (fp32: 4)


def test_fp16_export_answers_like_pytorch(fp16_export):
    model_dir, out = fp16_export
    from pcbedge.families.qwen_vl.parity import random_board
    img = random_board(56, 84, 3)
    onnx_runner, torch_runner = load_runner(out, threads=1), load_runner(model_dir)
    q = "where are the defects?"
    a = onnx_runner.answer(onnx_runner.encode(onnx_runner.prepare(img)), q, max_new_tokens=8)
    b = torch_runner.answer(torch_runner.encode(torch_runner.prepare(img)), q,
                            max_new_tokens=8)
    assert len(a["token_ids"]) == 8 and a["token_ids"] == b["token_ids"]


def test_build_widens_fp16_and_quantizes(fp16_export, tmp_path):
    _, out = fp16_export
    bundle = build_bundle("x86-cpu", out, tmp_path / "x86", progress=False)
    m = read_manifest(bundle)
    assert m["reference"]["export_precision"] == "fp16"
    assert m["precision"] == {"vision": "int8", "decoder": "int8"}
    assert not (bundle / ".fp32").exists()
    for g in m["graphs"].values():
        assert not _float16_anywhere(bundle / g["file"]), g["file"]
    assert set(m["quantization"]["graphs"]) == {"vision", "decoder"}
    runner = load_runner(bundle, threads=1)
    from pcbedge.families.qwen_vl.parity import random_board
    board = random_board(56, 84, 1)
    ans = runner.answer(runner.encode(runner.prepare(board, board)), "where?",
                        max_new_tokens=4)
    assert ans["info"]["new_tokens"] >= 1


def _fp16_graph(tmp_path, external: bool):
    """y = Cast(x -> fp16) @ W + ConstantOfShape(1.5) * Constant(c) -> Cast(float32)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float16)
    c = rng.standard_normal(6).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["xh", "W"], ["mm"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.5], np.float16), "v")),
        helper.make_node("Mul", ["ones", "c"], ["bias"]),
        helper.make_node("Add", ["mm", "bias"], ["yh"]),
        helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        initializer=[numpy_helper.from_array(w, "W")],
        value_info=[helper.make_tensor_value_info("mm", TensorProto.FLOAT16, [2, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "g.onnx"
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="g.onnx.data",
                  size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path, w, c


@pytest.mark.parametrize("external", [False, True])
def test_widen_graph_turns_every_fp16_tensor_float32(tmp_path, external):
    src, w, c = _fp16_graph(tmp_path, external)
    dst = tmp_path / "out" / "g.onnx"
    dst.parent.mkdir()
    counts = widen_graph(src, dst)
    assert counts["initializers"] == 1 and counts["casts"] == 1   # x -> fp16 became float32
    assert counts["attributes"] == 2 and counts["value_types"] == 1
    assert (dst.parent / "g.onnx.data").exists() == external
    assert not _float16_anywhere(dst)
    onnx.checker.check_model(str(dst), full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})[0]
    want = x @ w.astype(np.float32) + 1.5 * c.astype(np.float32)   # float32 math, fp16 weights
    np.testing.assert_allclose(run(dst), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(src), want, rtol=2e-2, atol=2e-2)


def test_bf16_needs_no_check_and_the_build_refuses_it(tmp_path):
    model_dir = tiny_qwen2_vl(tmp_path, "qwen2_vl")
    with pytest.raises(ExportError, match="bf16.*parity"):
        export_model(model_dir, tmp_path / "checked", precision="bf16", progress=False)
    assert not (tmp_path / "checked").exists()
    with pytest.raises(ExportError, match="opset 18"):
        export_model(model_dir, tmp_path / "o18", precision="bf16", check=False, opset=18,
                     progress=False)
    out = export_model(model_dir, tmp_path / "bf16", precision="bf16", check=False,
                       progress=False)
    m = read_manifest(out)
    assert m["export_precision"] == "bf16" and m["parity"] is None
    assert m["exporter"]["opset"] >= 22
    assert TensorProto.BFLOAT16 in _tensors(out / "decoder.onnx").values()
    with pytest.raises(BundleError, match="bf16"):
        build_bundle("x86-cpu", out, tmp_path / "x86", progress=False)
    assert not (tmp_path / "x86").exists()


def test_refusals_name_the_value_and_the_fix(tmp_path):
    fam = get_family(DEFAULT_FAMILY)
    assert fam.export_precisions == ("fp32",)    # the reference family: fp32 only
    model_dir = fam.module("testing").tiny_model(tmp_path)
    with pytest.raises(ExportError, match="fp16") as e:
        export_model(model_dir, tmp_path / "o", precision="fp16", progress=False)
    assert "--precision fp32" in e.value.fix
    with pytest.raises(ExportError, match="'fp8'"):
        export_model(model_dir, tmp_path / "o", precision="fp8", progress=False)
    result = CliRunner().invoke(cli, ["export", "--model", str(model_dir), "--out",
                                      str(tmp_path / "o"), "--precision", "fp8"])
    assert result.exit_code == ExportError.exit_code
    assert "fp8" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_every_family_declares_its_export_precisions():
    for name in FAMILIES:
        fam = get_family(name)
        assert fam.export_precisions[0] == "fp32"
        assert set(fam.export_precisions) <= set(PRECISIONS)
