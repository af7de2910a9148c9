"""Stage A's hard-defect sampling (hard_mining.py): the draw follows the difficulties, the focused
crop holds its defect and says where, the difficulty is read from the training pass, and a
resumed stage draws what the unbroken one drew."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pcbedge.families.pcbvlm.model.hard_mining import (DefectDifficulty, centre_prob,  # noqa: E402
                                                       find_focus)
from pcbedge.families.pcbvlm.model.resume import StageCheckpoint  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "pcbedge/data/sample"


def test_draws_follow_difficulty_and_boards_without_defects_are_never_drawn():
    d = DefectDifficulty([2, 0, 3], floor=0.0)
    assert len(d) == 5 and d.index[2] == (2, 0)
    d.difficulty[:] = 0.0
    d.difficulty[3] = 1.0                                   # board 2, defect 1
    rng = random.Random(0)
    assert {d.pick(rng) for _ in range(50)} == {(2, 1)}
    d.difficulty[:] = [0.9, 0.1, 0.0, 0.0, 0.0]
    draws = [d.pick(rng) for _ in range(2000)]
    assert 0.85 < draws.count((0, 0)) / 2000 < 0.95 and set(draws) == {(0, 0), (0, 1)}
    # the floor keeps every defect reachable
    f = DefectDifficulty([2, 3], floor=0.05)
    f.difficulty[:] = 0.0
    assert len({f.pick(rng) for _ in range(400)}) == 5


def test_update_is_a_running_mean_of_the_miss_and_state_round_trips():
    d = DefectDifficulty([1, 2], momentum=0.5)
    d.update(1, 1, prob=0.8)                                 # 0.5 * 1 + 0.5 * 0.2
    assert d.difficulty.tolist() == pytest.approx([1.0, 1.0, 0.6])
    e = DefectDifficulty([1, 2])
    e.load_state_dict(d.state_dict())
    assert e.difficulty.tolist() == pytest.approx([1.0, 1.0, 0.6])
    with pytest.raises(ValueError, match="holds 3 defects, the training boards 2"):
        DefectDifficulty([2]).load_state_dict(d.state_dict())


def test_find_focus_matches_by_overlap_or_says_none():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    assert find_focus(boxes, np.array([21, 20, 40, 41], np.float32)) == 1
    assert find_focus(boxes, np.array([30, 30, 50, 50], np.float32)) == -1   # IoU 0.14
    assert find_focus(boxes[:0], np.array([0, 0, 10, 10], np.float32)) == -1
    assert find_focus(boxes, None) == -1


def test_centre_prob_reads_the_target_cell():
    heat = torch.full((2, 6, 16, 16), -9.0)
    heat[1, 3, 5, 7] = 2.0                                   # crop 1, class 3, cell (y 5, x 7)
    box = [24, 16, 36, 28]                       # centre (30, 22): cell (7, 5) at stride 4
    assert centre_prob(heat, 1, box, 3, 4) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    assert centre_prob(heat, 0, box, 3, 4) < 1e-3


def _board():
    temp = np.zeros((320, 320), np.uint8)
    for y in range(10, 310, 20):
        temp[y:y + 3, 10:310] = 255
    test = temp.copy()
    test[50:73, 100:106] = 255
    test[110:113, 200:208] = 0
    test[250:260, 260:261] = 255
    boxes = np.array([[100, 50, 106, 73], [200, 110, 208, 113], [260, 250, 261, 260]], np.float32)
    return SimpleNamespace(img=np.stack([test, temp]), boxes=boxes, types=np.array([1, 0, 3]))


@pytest.mark.parametrize("augment", [False, True])
def test_focused_crop_holds_its_defect_and_points_at_it(augment):
    from pcbedge.families.pcbvlm.model.augment_layout import DefectBank
    from pcbedge.families.pcbvlm.model.train import FinetuneConfig, sample_focused_crop
    bd = _board()
    fc = FinetuneConfig(scale_jitter=0.25, p_line=0.5, p_paste=1.0) if augment else None
    bank = DefectBank([_board()]) if augment else None
    rng = random.Random(3)
    found = 0
    for _ in range(40):
        for defect in range(3):
            x, b, t, j = sample_focused_crop(rng, bd, defect, 96, fc, bank)
            assert x.shape == (3, 96, 96) and len(b) == len(t)
            if j < 0:
                continue
            found += 1
            assert t[j] == bd.types[defect]
            # the pointed box is where test and template differ in the crop
            x1, y1, x2, y2 = np.floor(b[j]).astype(int)
            img = np.round(x[:2] * 255).astype(np.int16)
            patch = np.abs(img[0] - img[1])[max(y1 - 1, 0):y2 + 2, max(x1 - 1, 0):x2 + 2]
            assert patch.max() > 0
    assert found >= (100 if augment else 110)               # of 120: the defect stays in view


def test_stage_a_with_hard_mining_learns_difficulties_and_resumes_exactly(tmp_path, monkeypatch):
    from pcbedge.data.deeppcb import read_list
    from pcbedge.families.pcbvlm.model import train as T
    from pcbedge.families.pcbvlm.testing import keep_resume_state_at, tiny_pcbvlm_model
    boards = [T.Board8(b, 640) for b in read_list(SAMPLE, SAMPLE / "calib.txt")[:2]]
    fc = T.FinetuneConfig(minutes_a=30, steps_a=3, batch_a=4, crop=64, hard_mining=1.0,
                          checkpoint_minutes=1e-9, resume=True)
    seen = keep_resume_state_at(monkeypatch, 2, tmp_path / "at_step_2.pt")
    made = []
    monkeypatch.setattr(T, "DefectDifficulty",
                        lambda n: made.append(DefectDifficulty(n)) or made[-1])
    unbroken = tiny_pcbvlm_model()
    (tmp_path / "a").mkdir()
    with open(tmp_path / "log_a", "w") as logf:
        T.train_vision(unbroken, boards, fc, logf, StageCheckpoint(
            tmp_path / "a", "stage_a", fc.checkpoint_minutes, fc.settings(), True))
    at2 = torch.load(seen["path"], weights_only=False)["modules"]["hard"]["difficulty"]
    assert (at2 < 1.0).sum() >= 4                             # 8 focused crops read so far

    (tmp_path / "b").mkdir()
    shutil.copy(seen["path"], tmp_path / "b" / "stage_a.resume.pt")
    resumed = tiny_pcbvlm_model()
    with open(tmp_path / "log_b", "w") as logf:
        T.train_vision(resumed, boards, fc, logf, StageCheckpoint(
            tmp_path / "b", "stage_a", fc.checkpoint_minutes, fc.settings(), True))
    # the difficulties came back with the weights: the resumed stage ends where the unbroken one did
    np.testing.assert_allclose(made[1].difficulty, made[0].difficulty, atol=1e-6)
    for (name, a), b in zip(unbroken.vision.state_dict().items(),
                            resumed.vision.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
