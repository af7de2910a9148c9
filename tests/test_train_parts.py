"""Pieces of the reference model's training that decide what it learns (no training run)."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pcbedge.data.qa import vocabulary_corpus  # noqa: E402
from pcbedge.families.pcbvlm.tokenizer import build_tokenizer, encode_question  # noqa: E402
from pcbedge.families.pcbvlm.model.train import with_tokenizer  # noqa: E402
from pcbedge.families.pcbvlm.model.train_lm import pointer_set_loss  # noqa: E402
from pcbedge.families.pcbvlm.testing import TINY_NUM_REGIONS, tiny_pcbvlm_model  # noqa: E402


def test_pointer_set_loss_is_minus_log_mass_on_the_allowed_regions():
    off, K = 5, 4
    logits = torch.randn(2, 3, off + K)
    lab = torch.tensor([[off + 1, 2, -100], [off + 3, off + 0, 4]])
    targets = torch.zeros(2, 3, K, dtype=torch.bool)
    targets[0, 0, [1, 2]] = True
    targets[1, 0, [3, 0]] = True
    targets[1, 1, [0]] = True
    loss = pointer_set_loss(logits, targets, lab, off)
    p = torch.softmax(logits, -1)
    assert loss[0, 0].item() == pytest.approx(-math.log(p[0, 0, off + 1] + p[0, 0, off + 2]),
                                              rel=1e-5)
    assert loss[1, 1].item() == pytest.approx(-math.log(p[1, 1, off]), rel=1e-5)
    assert loss[0, 1].item() == 0.0 and loss[1, 2].item() == 0.0   # not REGION labels
    # a single allowed region: the same as cross-entropy on it
    ce = torch.nn.functional.cross_entropy(logits[1, 1:2], lab[1, 1:2])
    assert loss[1, 1].item() == pytest.approx(ce.item(), rel=1e-5)


def test_make_batch_targets_every_unreported_true_region():
    import random

    from pcbedge.data.qa import QuestionGenerator
    from pcbedge.families.pcbvlm.model.train import FinetuneConfig
    from pcbedge.families.pcbvlm.model.train_lm import make_batch
    model = tiny_pcbvlm_model()
    K = TINY_NUM_REGIONS
    match = np.full(K, -1)
    match[[1, 3, 6]] = [0, 1, 0]            # three true regions: open, short, open
    item = {"c32": torch.zeros(1), "raw": torch.zeros(1), "match": match}
    fc = FinetuneConfig(batch_b=8, word_dropout=0.0)
    gen = QuestionGenerator(seed=0)
    ids, lab, _, _, targets = make_batch(model, [item], random.Random(0), gen, fc, 40)
    off = model.spec["region_offset"]
    for b in range(lab.shape[0]):
        regs = [(t, int(v) - off) for t, v in enumerate(lab[b].tolist()) if v >= off]
        for j, (t, k) in enumerate(regs):
            allowed = set(np.nonzero(targets[b, t].numpy())[0].tolist())
            assert allowed == {r for _, r in regs[j:]}        # this one and all still to come
        others = [t for t in range(lab.shape[1]) if t not in {t for t, _ in regs}]
        assert not targets[b, others].any()


def test_with_tokenizer_keeps_known_rows_and_answers_the_same():
    model = tiny_pcbvlm_model()
    old = model.tokenizer
    tok = build_tokenizer(vocabulary_corpus() + ["zorbulate the gizmos"], TINY_NUM_REGIONS)
    assert tok.get_vocab_size() > old.get_vocab_size()
    new = with_tokenizer(model, tok)
    assert new.tokenizer is tok and new.cfg.text.vocab_size == tok.get_vocab_size()
    q = "where are the shorts?"
    ids_old = torch.tensor([encode_question(old, q, 40)])
    ids_new = torch.tensor([encode_question(tok, q, 40)])
    vis = torch.randn(1, 6, model.cfg.text.d_model)
    reg = torch.randn(1, TINY_NUM_REGIONS, model.cfg.text.d_model)
    with torch.no_grad():
        a = model.decoder.forward_full(vis, reg, ids_old)[0, -1]
        b = new.decoder.forward_full(vis, reg, ids_new)[0, -1]
    ov, nv = old.get_vocab(with_added_tokens=True), tok.get_vocab(with_added_tokens=True)
    for t in ("<q_where>", "<f_short>", "<eos>", "where"):
        assert a[ov[t]].item() == pytest.approx(b[nv[t]].item(), abs=1e-5)
    V_old, V_new = model.cfg.text.text_vocab, new.cfg.text.text_vocab
    assert torch.allclose(a[V_old:], b[V_new:], atol=1e-5)     # pointer logits
    # a new word starts from its old pieces, not from noise
    g = nv["gizmos"]
    pieces = old.encode("gizmos", add_special_tokens=False).ids
    assert torch.allclose(new.decoder.tok.weight[g], model.decoder.tok.weight[pieces].mean(0))
    assert with_tokenizer(new, tok) is new        # same vocabulary: nothing to do


def test_finetune_refuses_an_unknown_split_before_writing(tmp_path):
    from pcbedge.errors import DatasetError
    from pcbedge.families.pcbvlm.model.train import FinetuneConfig, finetune
    with pytest.raises(DatasetError, match="'groups'"):
        finetune(tmp_path / "data", tmp_path / "out", FinetuneConfig(split="groups"))
    assert not (tmp_path / "out").exists()
