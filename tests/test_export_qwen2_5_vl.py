"""Qwen2.5-VL: what differs from Qwen2-VL on the host side. The export, graphs, generation and
pruning tests of this family run in test_export_qwen2_vl.py (parametrised over both)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from pcbedge.families.qwen_vl.export import VisionGraph, vision_feeds  # noqa: E402
from pcbedge.families.qwen_vl import preprocess as qp  # noqa: E402
from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl_model  # noqa: E402

GRIDS = ([(1, 4, 6)], [(1, 8, 8), (1, 4, 6)], [(1, 12, 16)], [(1, 2, 2)])


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_vl_model("qwen2_5_vl")[0]


@pytest.mark.parametrize("grids", GRIDS)
def test_window_index_equals_transformers(model, grids):
    visual = model.model.visual
    idx, cu = qp.window_index(np.asarray(grids), visual.window_size, visual.patch_size,
                              visual.spatial_merge_size)
    ref_idx, ref_cu = visual.get_window_index(torch.tensor(grids))
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(cu, torch.unique_consecutive(torch.tensor(ref_cu)).numpy())


@pytest.mark.parametrize("grids", GRIDS)
def test_vision_rotary_equals_transformers(model, grids):
    visual = model.model.visual
    head_dim = visual.config.hidden_size // visual.config.num_heads
    got = qp.vision_rotary(np.asarray(grids), head_dim, visual.spatial_merge_size)
    np.testing.assert_allclose(got, visual.rot_pos_emb(torch.tensor(grids)).numpy(), atol=1e-6)


@pytest.mark.parametrize("grids", GRIDS)
def test_masked_window_attention_equals_transformers(model, grids):
    """The tracing patch (block-diagonal masks instead of per-window loops) in PyTorch."""
    n = sum(t * h * w for t, h, w in grids)
    px = torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    f = {k: torch.from_numpy(v) for k, v in vision_feeds(model, grids).items()}
    with torch.no_grad():
        ref = model.model.visual(px, grid_thw=torch.tensor(grids))
        got = VisionGraph(model.model.visual, True)(px, f["rotary"], f["cu_seqlens"],
                                                    f["window_index"], f["window_reverse"],
                                                    f["cu_window_seqlens"])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
