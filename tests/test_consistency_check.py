"""The template-consistency check (VisionConfig.min_support): a proposal without test/template
difference at its place scores 0, in the vision graph, so no answer can report it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pcbedge.export.exporter import export_model
from pcbedge.families.pcbvlm.model.vision import difference_support
from pcbedge.testing import random_pair_input
from pcbedge.families.pcbvlm.testing import tiny_pcbvlm_model

torch.set_num_threads(1)


def _erode(a: np.ndarray, k: int) -> np.ndarray:
    p = np.pad(a, ((0, k - 1), (0, k - 1)), constant_values=0)
    return np.min([p[dy:dy + a.shape[0], dx:dx + a.shape[1]]
                   for dy in range(k) for dx in range(k)], axis=0)


def _support_by_hand(diff: np.ndarray, box, margin: int, core: int) -> float:
    h, w = diff.shape
    x1 = int(np.clip(np.floor(box[0] - margin), 0, w))
    y1 = int(np.clip(np.floor(box[1] - margin), 0, h))
    x2 = int(np.clip(np.ceil(box[2] + margin), 0, w))
    y2 = int(np.clip(np.ceil(box[3] + margin), 0, h))
    return float(_erode((diff > 0.5).astype(np.float32), core)[y1:y2, x1:x2].sum())


@pytest.mark.parametrize("core", [1, 2, 3])
def test_support_counts_by_hand(core):
    rng = np.random.default_rng(core)
    diff = rng.random((2, 1, 40, 50)).astype(np.float32)
    boxes = rng.uniform(-5, 55, (2, 9, 4)).astype(np.float32)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 1)
    got = difference_support(torch.from_numpy(diff), torch.from_numpy(boxes), 2, core).numpy()
    for i in range(2):
        for k in range(9):
            assert got[i, k] == _support_by_hand(diff[i, 0], boxes[i, k], 2, core)
    assert got.max() > 0 and (got == 0).any()


def test_erosion_drops_one_pixel_slivers():
    """A 1 px line of difference (what misregistration leaves along a copper edge) has no
    support at core 2; a 3 x 3 blob keeps 4 pixels at core 2 and 1 at core 3."""
    d = torch.zeros(1, 1, 20, 20)
    d[0, 0, 5, 2:18] = 1.0
    d[0, 0, 12:15, 12:15] = 1.0
    line, blob = torch.tensor([[[0., 3., 19., 7.]]]), torch.tensor([[[11., 11., 16., 16.]]])
    assert difference_support(d, line, 0, 1).item() == 16
    assert difference_support(d, line, 0, 2).item() == 0
    assert difference_support(d, blob, 0, 2).item() == 4
    assert difference_support(d, blob, 0, 3).item() == 1


def _half_changed(seed: int) -> np.ndarray:
    """A random input whose left half differs from its template throughout (so proposals there
    have support) and whose right half equals it (none)."""
    x = random_pair_input(128, seed=seed)
    x[0, :, :64] = 1.0 - x[1, :, :64]
    x[2] = np.abs(x[0] - x[1])
    return x


def _checked_model(min_support: float, core: int = 1):
    m = tiny_pcbvlm_model()
    m.cfg = replace(m.cfg, vision=replace(m.cfg.vision, min_support=min_support,
                                          support_core=core))
    m.vision.cfg = m.cfg
    return m


def test_gate_zeroes_unsupported_scores():
    x = torch.from_numpy(_half_changed(3))[None]
    free, checked = _checked_model(0.0), _checked_model(20.0)
    with torch.no_grad():
        ef, ec = free.encode_image(x), checked.encode_image(x)
    support = difference_support(x[:, 2:3], ef["region_boxes"], 2, 1)
    keep = support >= 20
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(ec["region_scores"], ef["region_scores"] * keep)
    # the decoder's region tokens are unchanged: only the score output is gated
    torch.testing.assert_close(ec["region_tokens"], ef["region_tokens"])


def test_template_against_itself_reports_nothing():
    """With the check on, a board identical to its template can report no defect, whatever the
    heatmap says: every proposal scores 0, below min_region_score."""
    x = random_pair_input(128, seed=4)
    x[0], x[2] = x[1], 0.0
    free, checked = _checked_model(0.0), _checked_model(1.0)
    with torch.no_grad():
        assert free.encode_image(torch.from_numpy(x)[None])["region_scores"].max() > 0.05
    ans = checked.answer(x, "list every defect.")
    assert ans["count"] == 0 and ans["defects"] == []
    with torch.no_grad():   # the board pass, which every question's answer reads, is empty
        state, _ = checked.board_pass(checked.encode_image(torch.from_numpy(x)[None]))
    assert state.defects == []


def test_check_exports_and_matches_torch(tmp_path):
    """The check is in the vision graph: export's parity passes, ONNX Runtime's region scores
    are gated like PyTorch's, and the answers are equal."""
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    _checked_model(20.0).save_pretrained(tmp_path / "m")
    model = PcbVlm.from_pretrained(tmp_path / "m")
    assert model.cfg.vision.min_support == 20.0 and model.cfg.vision.support_core == 1
    export_model(tmp_path / "m", tmp_path / "b")
    runner = PcbVlmOnnxRunner(tmp_path / "b")
    gated = 0
    for seed in range(3):
        xs = _half_changed(30 + seed)
        enc = runner.encode(xs)
        with torch.no_grad():
            ref = model.encode_image(torch.from_numpy(xs)[None])
        np.testing.assert_allclose(enc.outputs["region_scores"], ref["region_scores"].numpy(),
                                   atol=1e-5)
        gated += int((ref["region_scores"] == 0).sum())
        for q in ("where are the defects?", "how many defects are there?"):
            want, got = model.answer(xs, q), runner.answer(enc, q)
            assert got["token_ids"] == want["token_ids"] and got["defects"] == want["defects"]
    assert gated > 0


def _board(h: int = 64) -> np.ndarray:
    """A white (bare) 64 x 64 pair, copper dark: a trace along row 10-13 on both images."""
    x = np.ones((3, h, h), np.float32)
    x[0:2, 10:14, :] = 0.0
    return x


def test_template_island_by_hand():
    """Template copper missing from the board and isolated on the template: an island (the
    template's flaw). An open (a trace cut), spurious copper (the board adds copper) or an
    island with template copper within the ring: not."""
    from pcbedge.families.pcbvlm.model.vision import template_island
    x = _board()
    x[1, 40:44, 40:44] = 0.0                       # a speck on the template only
    x[0, 10:14, 20:24] = 1.0                       # an open: the board's trace is cut
    x[0, 50:53, 10:13] = 0.0                       # spurious copper: on the board only
    x[1, 30:33, 8:11] = 0.0                        # a template speck 3 px from
    x[1, 30:33, 14:16] = 0.0                       # ... more template copper
    x[2] = np.abs(x[0] - x[1])
    boxes = torch.tensor([[[40, 40, 44, 44], [20, 10, 24, 14], [10, 50, 13, 53],
                           [8, 30, 11, 33]]], dtype=torch.float32)
    got = template_island(torch.from_numpy(x)[None], boxes, margin=1, ring=4)
    assert got.tolist() == [[True, False, False, False]]
    # a ring too narrow to reach the neighbour: the fourth is an island too
    assert template_island(torch.from_numpy(x)[None], boxes, 0, 1).tolist()[0][3] is True


def test_template_hole_by_hand():
    """The other colour: a hole of the template inside copper that the board fills is the
    template's flaw too. A pin-hole of the board in the same copper, a short across a gap
    between two copper areas, and a template hole near the pour's edge (bare board within the
    ring): not."""
    from pcbedge.families.pcbvlm.model.vision import template_island
    x = np.ones((3, 64, 64), np.float32)
    x[0:2, 20:60, 4:60] = 0.0                      # a copper pour on both images
    x[1, 30:33, 30:33] = 1.0                       # a hole of the template only
    x[0, 45:48, 45:48] = 1.0                       # a pin-hole of the board only
    x[0:2, 20:60, 20:23] = 1.0                     # a gap splitting the pour on both ...
    x[0, 40:43, 20:23] = 0.0                       # ... which the board bridges (a short)
    x[1, 22:24, 8:11] = 1.0                        # a template hole 2 px from the bare edge
    x[2] = np.abs(x[0] - x[1])
    boxes = torch.tensor([[[30, 30, 33, 33], [45, 45, 48, 48], [20, 40, 23, 43],
                           [8, 22, 11, 24]]], dtype=torch.float32)
    got = template_island(torch.from_numpy(x)[None], boxes, margin=1, ring=4)
    assert got.tolist() == [[True, False, False, False]]


def test_template_island_rule_exports_and_matches_torch(tmp_path):
    """The rule is in the vision graph: parity passes and ONNX Runtime's region scores are gated
    like PyTorch's."""
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.model.vision import template_island
    from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
    m = tiny_pcbvlm_model()
    m.cfg = replace(m.cfg, vision=replace(m.cfg.vision, island_ring=3))
    m.vision.cfg = m.cfg
    m.save_pretrained(tmp_path / "m")
    model = PcbVlm.from_pretrained(tmp_path / "m")
    assert model.cfg.vision.island_ring == 3
    export_model(tmp_path / "m", tmp_path / "b")
    runner = PcbVlmOnnxRunner(tmp_path / "b")
    x = np.ones((3, 128, 128), np.float32)
    rng = np.random.default_rng(0)
    for _ in range(40):                            # template specks the board lacks
        r, c = rng.integers(4, 120, 2)
        x[1, r:r + 3, c:c + 3] = 0.0
    x[2] = np.abs(x[0] - x[1])
    enc = runner.encode(x)
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(x)[None])
        free = replace(model.cfg, vision=replace(model.cfg.vision, island_ring=0))
        model.vision.cfg = free
        ungated = model.encode_image(torch.from_numpy(x)[None])
    island = template_island(torch.from_numpy(x)[None], ungated["region_boxes"], 2, 3)
    assert island.any() and (~island).any()
    np.testing.assert_allclose(enc.outputs["region_scores"], ref["region_scores"].numpy(),
                               atol=1e-5)
    torch.testing.assert_close(ref["region_scores"], ungated["region_scores"] * ~island)
