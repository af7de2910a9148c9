"""Test fixtures of the reference family: a tiny random-weight PcbVlm built in-process (no
downloads). Plain functions, so tests, notebooks and subprocess checks can all call them; the
``testing`` role's ``tiny_model`` is what family-generic fixtures (``pcbedge.testing``) use."""
from __future__ import annotations

from pathlib import Path

TINY_NUM_REGIONS = 8


def tiny_pcbvlm_model(*, input_size: int = 128, seed: int = 0, num_regions: int = TINY_NUM_REGIONS):
    """A random-weight PcbVlm with 2 decoder layers and d_model 32 (seconds to export)."""
    import torch

    from pcbedge.data.qa import vocabulary_corpus
    from pcbedge.families.pcbvlm.model.config import PcbVlmConfig, TextConfig, VisionConfig
    from pcbedge.families.pcbvlm.model.model import PcbVlm
    from pcbedge.families.pcbvlm.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(vocabulary_corpus(), num_regions)
    cfg = PcbVlmConfig(
        input_size=input_size,
        vision=VisionConfig(widths=(8, 8, 16, 16, 32), fpn_ch=16, head_ch=16,
                            num_regions=num_regions),
        text=TextConfig(vocab_size=tok.get_vocab_size(), num_regions=num_regions, d_model=32,
                        n_layers=2, n_heads=2, d_ff=64))
    model = PcbVlm(cfg, tok)
    with torch.no_grad():  # non-zero type/pointer embeddings so every parameter is exercised
        for p in (model.decoder.type_vis, model.decoder.type_reg, model.decoder.ptr_in):
            p.normal_(std=0.1)
        # a random head gives nearly equal heatmap scores everywhere (~0.104); ORT and torch
        # then rank near-ties (1e-7 apart) differently. Spread the logits like a trained head.
        model.vision.head.heat[-1].weight.mul_(25.0)
    return model.eval()


def tiny_pcbvlm(tmp_path: str | Path, *, input_size: int = 128, seed: int = 0,
                name: str = "tiny-pcbvlm") -> Path:
    """Save a tiny random PcbVlm under ``tmp_path/name`` and return that model folder."""
    out = Path(tmp_path) / name
    tiny_pcbvlm_model(input_size=input_size, seed=seed).save_pretrained(out)
    return out


TINY_NAME = "tiny-pcbvlm"   # the folder tiny_model saves into


def tiny_model(folder: str | Path, name: str = TINY_NAME) -> Path:
    """The ``testing`` role: a tiny model of this family saved under ``folder/name``."""
    return tiny_pcbvlm(folder, name=name)


def keep_resume_state_at(monkeypatch, step: int, dest: str | Path) -> dict:
    """Every stage checkpoint saved at ``step`` is also copied to ``dest`` (the state a run
    "killed" right after that step would leave); the returned dict gets its ``"path"``."""
    import shutil

    from pcbedge.families.pcbvlm.model.resume import StageCheckpoint
    kept: dict = {}
    real_save = StageCheckpoint.maybe_save

    def save_and_keep(self, modules, opt, rngs, at, spent):
        ok = real_save(self, modules, opt, rngs, at, spent)
        if at == step:
            kept["path"] = shutil.copy(self.path, dest)
        return ok
    monkeypatch.setattr(StageCheckpoint, "maybe_save", save_and_keep)
    return kept
