"""The reference PCB VLM: vision encoder + projector + decoder, saved in a Hugging Face layout
(config.json, model.safetensors, tokenizer.json, generation_config.json), loaded without pickle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from pcbedge.errors import ModelError
from pcbedge.families.pcbvlm.model.config import PcbVlmConfig
from pcbedge.families.pcbvlm.model.decoder import Decoder
from pcbedge.families.pcbvlm.answer import board_budget, compose, run_board, run_program
from pcbedge.families.pcbvlm.grammar import DecodeState, grammar_spec
from pcbedge.families.pcbvlm.program import program_visual_tokens
from pcbedge.families.pcbvlm.tokenizer import encode_question, encode_question_numbers
from pcbedge.families.pcbvlm.model.vision import Projector, VisionEncoder

FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


class PcbVlm(nn.Module):
    def __init__(self, cfg: PcbVlmConfig, tokenizer: Tokenizer, calibration: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.calibration = dict(calibration or {"a": 1.0, "b": 0.0})
        self.vision = VisionEncoder(cfg)
        self.projector = Projector(cfg)
        self.decoder = Decoder(cfg.text)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if len(vocab) != cfg.text.vocab_size:
            raise ModelError(f"tokenizer has {len(vocab)} tokens, config says "
                             f"{cfg.text.vocab_size}", fix="save model and tokenizer together")

    @property
    def spec(self) -> dict:
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return grammar_spec(vocab, self.cfg.vision.num_regions, self.cfg.min_region_score,
                            self.calibration, region_prior_weight=self.cfg.region_prior_weight,
                            region_prior_center=self.cfg.region_prior_center,
                            region_overlap_max=self.cfg.region_overlap_max,
                            region_overlap_metric=self.cfg.region_overlap_metric,
                            region_confidence=self.cfg.region_confidence)

    def encode_image(self, x: torch.Tensor) -> dict:
        """x [B,3,S,S] -> visual tokens, region tokens, region boxes/scores, token scores."""
        c32, boxes, scores, raw, prior, diff = self.vision(x)
        vis, reg = self.projector(c32, raw)
        return {"visual_tokens": vis, "region_tokens": reg, "region_boxes": boxes,
                "region_scores": scores, "token_prior": prior, "token_diff": diff}

    @torch.no_grad()
    def answer(self, x: np.ndarray, question: str, meta=None, max_new_tokens: int = 64,
               keep: np.ndarray | None = None) -> dict:
        """Greedy grammar-constrained answer for one preprocessed pair x [3,S,S] (reference path,
        same algorithm as the ONNX runner). ``keep`` optionally selects visual tokens."""
        self.eval()
        enc = self.encode_image(torch.from_numpy(x).unsqueeze(0))
        return self.answer_encoded(enc, question, meta, max_new_tokens, keep)

    @torch.no_grad()
    def program_pass(self, enc: dict, question: str, max_new_tokens: int = 64):
        """The program pass: (the decoded program's state, the question's numbers)."""
        max_q = self.cfg.text.max_text_len // 2
        ids, numbers = encode_question_numbers(self.tokenizer, question, max_q)
        n_vis = enc["visual_tokens"].shape[1]
        few = program_visual_tokens(n_vis, self.spec["program"].get("visual_tokens", 8))
        prefill, step = self._passes(enc, few)
        pstate, _ = run_program(self.spec, prefill, step, ids, len(numbers),
                                self.cfg.text.max_text_len, max_new_tokens)
        return pstate, numbers

    @torch.no_grad()
    def answer_encoded(self, enc: dict, question: str, meta=None, max_new_tokens: int = 64,
                       keep: np.ndarray | None = None, program=None) -> dict:
        """As :meth:`answer`, on the outputs of :meth:`encode_image` (one image, many questions):
        the program pass on the question (or ``program``, a :meth:`program_pass` result of the
        same question), the board pass, and the answer they make."""
        pstate, numbers = program or self.program_pass(enc, question, max_new_tokens)
        bstate, _ = self.board_pass(enc, board_budget(self.spec), keep)
        to_orig = meta.to_original if meta is not None else (lambda b: list(b))
        quality = meta.quality_dict() if meta is not None else None
        size = (meta.orig_w, meta.orig_h) if meta is not None else (self.cfg.input_size,) * 2
        ans, out = compose(self.spec, pstate, numbers, bstate, enc["region_boxes"][0].numpy(),
                           to_orig, size, quality, max_new_tokens)
        ans["token_ids"] = out
        ans["raw"] = self.tokenizer.decode(out, skip_special_tokens=False)
        return ans

    def _passes(self, enc: dict, keep: np.ndarray | None):
        vis = enc["visual_tokens"] if keep is None else enc["visual_tokens"][:, torch.as_tensor(keep)]
        reg = enc["region_tokens"]

        def prefill(ids):
            logits, past = self.decoder.prefill(vis, reg, torch.tensor([ids]))
            return logits[0].numpy(), past

        def step(tok, pos, past):
            logits, past = self.decoder.step(torch.tensor([[tok]]), torch.tensor([[pos]]), reg,
                                             past)
            return logits[0].numpy(), past
        return prefill, step

    @torch.no_grad()
    def board_pass(self, enc: dict, max_new_tokens: int | None = None,
                   keep: np.ndarray | None = None) -> tuple[DecodeState, list[int]]:
        """The board pass (fixed question, every defect): the final state (defects with their
        raw, unrounded log-probabilities; what calibration fits on) and the generated ids."""
        ids = encode_question(self.tokenizer, self.spec["canonical_question"],
                              self.cfg.text.max_text_len // 2)
        prefill, step = self._passes(enc, keep)
        return run_board(self.spec, prefill, step, ids, enc["region_scores"][0].numpy(),
                         enc["region_boxes"][0].numpy(), self.cfg.text.max_text_len,
                         max_new_tokens or board_budget(self.spec))

    def save_pretrained(self, out: str | Path, extra_generation: dict | None = None) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.cfg.save(out / "config.json")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save(str(out / "tokenizer.json"))
        gen = {"max_new_tokens": 64, "decoding": "greedy, grammar-constrained",
               "calibration": self.calibration, "grammar": self.spec, **(extra_generation or {})}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PcbVlm":
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"model folder {path} not found", fix="pass --model DIR")
        from pcbedge.checkpoint import load_state
        for f in FILES:
            if f == "model.safetensors" and (path / "model.safetensors.index.json").is_file():
                continue                        # shards: load_state checks them
            if not (path / f).is_file():
                pickles = sorted(p.name for p in path.glob("*.bin")) + \
                    sorted(p.name for p in path.glob("*.pt")) + sorted(p.name for p in path.glob("*.pth"))
                hint = (f"; found {pickles}: pickle checkpoints are refused, convert them to "
                        "safetensors") if pickles else ""
                raise ModelError(f"{path} lacks {f}{hint}", fix=f"a model folder holds {', '.join(FILES)}")
        cfg = PcbVlmConfig.load(path / "config.json")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        gen = json.loads((path / "generation_config.json").read_text())
        model = cls(cfg, tok, gen.get("calibration"))
        state = load_state(path)           # one file, or save_pretrained's shards
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"weights do not match the config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}", fix="save model and config together")
        return model.eval()
