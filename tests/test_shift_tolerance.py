"""The consistency check made tolerant of local misregistration (VisionConfig.shift_tolerance):
a proposal needs a test/template difference that survives every small shift of the template,
counted by hand here, gated in the vision graph, and exported with parity."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pcbedge.errors import ModelError
from pcbedge.export.exporter import export_model
from pcbedge.families.pcbvlm.model.config import PcbVlmConfig, VisionConfig
from pcbedge.families.pcbvlm.model.vision import difference_support, shift_tolerant_support
from pcbedge.families.pcbvlm.testing import tiny_pcbvlm_model

torch.set_num_threads(1)


def _by_hand(x: np.ndarray, box, margin: int, core: int, shift: int, crop: int,
             step: int = 1) -> float:
    """The docstring's definition, one box, numpy: every shift of the (edge-replicated)
    template, the eroded XOR of copper, summed over the grown box within the crop square."""
    h, w = x.shape[1:]
    e = core - 1          # beyond the image, both images repeat their edge pixels
    test = np.pad(x[0] < 0.5, ((0, e), (0, e)), mode="edge")
    temp = np.pad(x[1] < 0.5, ((shift, shift + e), (shift, shift + e)), mode="edge")
    cx, cy = np.floor((box[0] + box[2]) / 2), np.floor((box[1] + box[3]) / 2)
    qx, qy = int(min(max(cx - crop // 2, 0), w - crop)), int(min(max(cy - crop // 2, 0), h - crop))
    x1, y1 = max(int(np.floor(box[0] - margin)), qx), max(int(np.floor(box[1] - margin)), qy)
    x2 = min(int(np.ceil(box[2] + margin)), qx + crop)
    y2 = min(int(np.ceil(box[3] + margin)), qy + crop)
    best = None
    for dy in range(-shift, shift + 1, step):
        for dx in range(-shift, shift + 1, step):
            t = temp[shift + dy:shift + dy + h + e, shift + dx:shift + dx + w + e]
            d = (test != t).astype(np.int64)
            er = np.min([d[i:i + h, j:j + w] for i in range(core) for j in range(core)], axis=0)
            s = int(er[y1:max(y2, y1), x1:max(x2, x1)].sum())
            best = s if best is None else min(best, s)
    return float(best)


@pytest.mark.parametrize("core,shift,crop,step", [(1, 1, 24, 1), (2, 2, 24, 1), (2, 1, 40, 1),
                                                  (2, 2, 24, 2), (3, 3, 32, 3)])
def test_counts_by_hand(core, shift, crop, step):
    rng = np.random.default_rng(core * 10 + shift)
    x = (rng.random((2, 3, 56, 64)) > 0.5).astype(np.float32)
    boxes = rng.uniform(-4, 60, (2, 8, 4)).astype(np.float32)
    boxes[..., 2:] = boxes[..., :2] + rng.uniform(1, 50, (2, 8, 2))
    got = shift_tolerant_support(torch.from_numpy(x), torch.from_numpy(boxes), 2, core, shift,
                                 crop, step).numpy()
    for i in range(2):
        for k in range(8):
            assert got[i, k] == _by_hand(x[i], boxes[i, k], 2, core, shift, crop, step), (i, k)


def _trace_pair(offset: int) -> np.ndarray:
    """Bare board (1), a 6 px copper trace (0) along rows 20-25 on the template, the test's
    trace ``offset`` px lower (a local misregistration), and a 5 x 5 pin hole in the test's
    copper pour at rows 40-44."""
    x = np.ones((3, 64, 64), np.float32)
    x[1, 20:26, :] = 0.0
    x[0, 20 + offset:26 + offset, :] = 0.0
    x[0:2, 36:50, 30:60] = 0.0
    x[0, 40:45, 40:45] = 1.0
    x[2] = np.abs(x[0] - x[1])
    return x


def test_misregistration_counts_nothing_a_defect_counts():
    """A trace 2 px off leaves 2 px slivers on both edges: the plain check (core 2) counts them,
    the shift-tolerant one (2 px) counts none, but does count a trace 4 px off; with the shifts
    -2, 0, 2 only, 1-3 px off still count nothing; the pin hole keeps its pixels at every
    shift."""
    x = torch.from_numpy(_trace_pair(2))[None]
    sliver = torch.tensor([[[10., 18., 40., 28.]]])
    hole = torch.tensor([[[40., 40., 45., 45.]]])
    assert difference_support(x[:, 2:3], sliver, 2, 2).item() > 20
    assert shift_tolerant_support(x, sliver, 2, 2, 2, 32).item() == 0
    far = torch.from_numpy(_trace_pair(4))[None]          # 4 px off: out of a 2 px reach
    assert shift_tolerant_support(far, sliver, 2, 2, 2, 32).item() > 0
    # shifts -2, 0, 2 only: a 1, 2 or 3 px translation still leaves nothing past the erosion
    for off in (1, 2, 3):
        moved = torch.from_numpy(_trace_pair(off))[None]
        assert shift_tolerant_support(moved, sliver, 2, 2, 2, 32, step=2).item() == 0
    assert shift_tolerant_support(x, hole, 2, 2, 2, 32, step=2).item() >= 4
    assert shift_tolerant_support(x, hole, 2, 2, 2, 32).item() >= 4


def _tolerant_model(shift: int):
    m = tiny_pcbvlm_model()
    m.cfg = replace(m.cfg, vision=replace(m.cfg.vision, shift_tolerance=shift, shift_crop=24,
                                          shift_min_support=2.0))
    m.vision.cfg = m.cfg
    return m


def _misregistered(seed: int) -> np.ndarray:
    """Random copper blocks on a 128 px template, the test a copy moved 1-2 px in places, and
    a few real defects (blocks flipped)."""
    rng = np.random.default_rng(seed)
    temp = np.ones((128, 128), np.float32)
    for _ in range(30):
        r, c = rng.integers(0, 120, 2)
        temp[r:r + rng.integers(3, 10), c:c + rng.integers(3, 10)] = 0.0
    test = temp.copy()
    test[:64] = np.roll(temp[:64], 2, axis=1)
    for _ in range(3):
        r, c = rng.integers(70, 120, 2)
        test[r:r + 6, c:c + 6] = 1.0 - test[r:r + 6, c:c + 6]
    return np.stack([test, temp, np.abs(test - temp)]).astype(np.float32)


def test_gate_zeroes_unsupported_scores_and_exports(tmp_path):
    """In the vision graph: scores gated exactly by the support, region tokens untouched; the
    graph exports, passes parity, ONNX Runtime gates like PyTorch, and TensorRT's parser rules
    find no blocker."""
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    free, tol = _tolerant_model(0), _tolerant_model(2)
    tol.save_pretrained(tmp_path / "m")
    model = PcbVlm.from_pretrained(tmp_path / "m")
    assert model.cfg.vision.shift_tolerance == 2 and model.cfg.vision.shift_crop == 24
    export_model(tmp_path / "m", tmp_path / "b")
    runner = PcbVlmOnnxRunner(tmp_path / "b")
    gated = kept = 0
    for seed in range(3):
        xs = _misregistered(seed)
        x = torch.from_numpy(xs)[None]
        with torch.no_grad():
            ef, ec = free.encode_image(x), model.encode_image(x)
        support = shift_tolerant_support(x, ef["region_boxes"], 2, 2, 2, 24)
        keep = support >= 2
        torch.testing.assert_close(ec["region_scores"], ef["region_scores"] * keep)
        torch.testing.assert_close(ec["region_tokens"], ef["region_tokens"])
        gated, kept = gated + int((~keep).sum()), kept + int(keep.sum())
        enc = runner.encode(xs)
        np.testing.assert_allclose(enc.outputs["region_scores"], ec["region_scores"].numpy(),
                                   atol=1e-5)
    assert gated > 0 and kept > 0
    # the check's ops (GatherElements, Slice, AveragePool, Floor, ReduceMin, ...) are ops that
    # TensorRT 10's parser takes: no blocker for the GPU targets
    from pcbedge.recipes.trt_ops import check_graph
    assert [v for v in check_graph(tmp_path / "b" / "vision.onnx", "vision")
            if v["severity"] == "blocker"] == []


@pytest.mark.parametrize("shift,crop,step", [(-1, 48, 1), (2, 2, 1), (2, 127, 1), (2, 48, 0)])
def test_bad_settings_are_typed_errors(shift, crop, step):
    with pytest.raises(ModelError, match="shift_tolerance") as e:
        PcbVlmConfig(input_size=128, vision=VisionConfig(shift_tolerance=shift, shift_crop=crop,
                                                         shift_step=step))
    assert "shift_crop" in e.value.fix
