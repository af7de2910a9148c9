"""A killed training run continues where it stopped (resume.py): the state file, a stage resumed
mid-way, and whole stages skipped on resume."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pcbedge.errors import ModelError  # noqa: E402
from pcbedge.families.pcbvlm.model.resume import StageCheckpoint  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "pcbedge/data/sample"


def _net_and_opt(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    return net, opt


def test_state_round_trip_and_refusals(tmp_path):
    net, opt = _net_and_opt()
    rng = random.Random(5)
    rng.random()
    ck = StageCheckpoint(tmp_path, "stage_a", 1e-9, {"seed": 0}, resume=True)
    assert ck.restore({"net": net}, opt, [rng]) == (0, 0.0)        # nothing saved yet
    assert ck.maybe_save({"net": net}, opt, [rng], 7, 12.5)
    want_next, want_torch = rng.random(), torch.rand(1)
    torch.manual_seed(123)

    net2, opt2 = _net_and_opt(seed=1)
    rng2 = random.Random(0)
    assert ck.restore({"net": net2}, opt2, [rng2]) == (7, 12.5)
    assert torch.equal(net2.weight, net.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert rng2.random() == want_next and torch.equal(torch.rand(1), want_torch)

    other = StageCheckpoint(tmp_path, "stage_a", 1e-9, {"seed": 1}, resume=True)
    with pytest.raises(ModelError, match="other settings .*differing: seed"):
        other.restore({"net": net2}, opt2, [rng2])
    fresh = StageCheckpoint(tmp_path, "stage_a", 1e-9, {"seed": 1}, resume=False)
    assert fresh.restore({"net": net2}, opt2, [rng2]) == (0, 0.0)   # not resuming: ignored
    assert not StageCheckpoint(tmp_path, "x", 0, {}, False).maybe_save({"net": net}, opt, [], 1, 1)

    ck.path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read the resume state"):
        ck.restore({"net": net2}, opt2, [rng2])
    assert ck.path.exists()                  # destroys nothing
    ck.finish()
    assert not ck.path.exists() and not list(tmp_path.glob(".*tmp*"))


def _boards(size):
    from pcbedge.data.deeppcb import read_list
    from pcbedge.families.pcbvlm.model.train import Board8
    return [Board8(b, size) for b in read_list(SAMPLE, SAMPLE / "calib.txt")[:2]]


def test_stage_a_resumed_mid_way_ends_where_the_unbroken_run_ends(tmp_path, monkeypatch):
    from pcbedge.families.pcbvlm.model import train as T
    from pcbedge.families.pcbvlm.testing import keep_resume_state_at, tiny_pcbvlm_model
    boards = _boards(128)
    fc = T.FinetuneConfig(minutes_a=30, steps_a=3, batch_a=2, crop=64, checkpoint_minutes=1e-9,
                          resume=True)
    saved = keep_resume_state_at(monkeypatch, 2, tmp_path / "at_step_2.pt")
    unbroken = tiny_pcbvlm_model()
    (tmp_path / "a").mkdir()
    with open(tmp_path / "log_a", "w") as logf:
        T.train_vision(unbroken, boards, fc, logf, StageCheckpoint(
            tmp_path / "a", "stage_a", fc.checkpoint_minutes, fc.settings(), True))

    # "killed" after step 2: a fresh process, a fresh model, the state saved at step 2
    (tmp_path / "b").mkdir()
    shutil.copy(saved["path"], tmp_path / "b" / "stage_a.resume.pt")
    resumed = tiny_pcbvlm_model()
    steps = []
    real_dense = type(resumed.vision).dense
    monkeypatch.setattr(type(resumed.vision), "dense",
                        lambda self, x: steps.append(1) or real_dense(self, x))
    with open(tmp_path / "log_b", "w") as logf:
        T.train_vision(resumed, boards, fc, logf, StageCheckpoint(
            tmp_path / "b", "stage_a", fc.checkpoint_minutes, fc.settings(), True))
    assert len(steps) == 1                                    # only step 3 ran again
    for (name, a), b in zip(unbroken.vision.state_dict().items(),
                            resumed.vision.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # without the resume the same fresh start differs: the comparison can fail
    restarted = tiny_pcbvlm_model()
    with open(tmp_path / "log_c", "w") as logf:
        T.train_vision(restarted, boards, replace(fc, steps_a=1), logf)
    assert not torch.allclose(restarted.vision.head.heat[-1].weight,
                              unbroken.vision.head.heat[-1].weight, atol=1e-6)


def test_finetune_resume_skips_saved_stages_and_refuses_other_settings(tmp_path, monkeypatch):
    from pcbedge.families.pcbvlm.model import train as T
    from pcbedge.families.pcbvlm.model import train_lm
    lst = tmp_path / "list.txt"
    lines = (SAMPLE / "trainval.txt").read_text().splitlines()
    lst.write_text("\n".join(lines[:5]) + "\n")
    fc = T.FinetuneConfig(minutes_a=0.002, minutes_b=0.002, n_dihedral=1,
                          quality_calibration=False, threads=1)
    out = tmp_path / "m"

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_lm, "train_decoder", killed)
    with pytest.raises(KeyboardInterrupt):
        T.finetune(SAMPLE, out, fc, list_file=lst)
    assert (out / "checkpoint_stage_a" / "config.json").exists()
    assert not (out / "checkpoint_stage_b").exists()
    first_a = (out / "checkpoint_stage_a" / "model.safetensors").read_bytes()

    monkeypatch.undo()
    monkeypatch.setattr(T, "train_vision", killed)              # stage A must not run again
    T.finetune(SAMPLE, out, replace(fc, resume=True), list_file=lst)
    assert (out / "checkpoint_stage_a" / "model.safetensors").read_bytes() == first_a
    assert (out / "config.json").exists() and not list(out.glob("*.resume.pt"))
    stages = {json.loads(x)["stage"] for x in (out / "train_log.jsonl").read_text().splitlines()}
    assert "C" in stages

    with pytest.raises(ModelError, match="other settings"):
        T.finetune(SAMPLE, out, replace(fc, resume=True, seed=9), list_file=lst)
    assert np.frombuffer(first_a, np.uint8).size > 0 and \
        (out / "checkpoint_stage_a" / "model.safetensors").read_bytes() == first_a


def test_vision_only_run_leaves_the_language_side_as_it_came(tmp_path, monkeypatch):
    # minutes_b = 0 with init_from: stage A continues a saved model's vision, no stage B runs
    # (nothing cached), and the projector and decoder are the saved model's
    from pcbedge.families.pcbvlm.model import train as T
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm_model
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join((SAMPLE / "trainval.txt").read_text().splitlines()[:5]) + "\n")
    tiny_pcbvlm_model().save_pretrained(tmp_path / "init")
    start = PcbVlm.from_pretrained(tmp_path / "init")

    def never(*a, **k):
        raise AssertionError("stage B ran")
    from pcbedge.families.pcbvlm.model import train_lm
    monkeypatch.setattr(train_lm, "cache_vision", never)
    monkeypatch.setattr(train_lm, "train_decoder", never)
    fc = T.FinetuneConfig(minutes_a=0.01, minutes_b=0.0, batch_a=2, crop=64, n_dihedral=1,
                          quality_calibration=False, threads=1, init_from=str(tmp_path / "init"))
    model, _ = T.finetune(SAMPLE, tmp_path / "m", fc, list_file=lst)
    for name, w in start.projector.state_dict().items():
        assert torch.equal(w, model.projector.state_dict()[name]), name
    moved = [n for n, w in start.vision.state_dict().items()
             if w.is_floating_point() and not torch.equal(w, model.vision.state_dict()[n])]
    assert moved                                   # stage A did train the vision
