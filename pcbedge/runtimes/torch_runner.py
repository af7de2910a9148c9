"""The PyTorch reference runner: the same ``ask`` interface as OnnxRunner, over the model's own
answer loop (``answer_encoded``), so answers can be compared token for token."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pcbedge.data.preprocess import PairMeta
from pcbedge.errors import InputImageError
from pcbedge.runtimes import validate_max_new_tokens, validate_question
from pcbedge.runtimes.base import AskMixin
from pcbedge.runtimes.pruning import (SCORE_OUTPUTS, TokenPruningConfig, as_pruning_config,
                                      select_tokens)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


class TorchRunner(AskMixin):
    """Runs a model folder with PyTorch; ``encode`` returns the model's encode_image dict."""

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, pruning=None,
                 device: str = "cpu"):
        import torch

        from pcbedge.export.families import detect_family

        self.model_dir = Path(model_dir)
        family = detect_family(self.model_dir)
        family.check_model_dir(self.model_dir)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.model = family.load_model(self.model_dir).to(device)
        self.device = device
        self.input_size = family.default_input_size(self.model)
        self.pruning = as_pruning_config(pruning)
        self._prefill_ms = 0.0
        self._timed_prefill()

    def _timed_prefill(self) -> None:
        """Time the decoder prefill inside the model's answer loop (to split prefill / decode)."""
        prefill = self.model.decoder.prefill

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = prefill(*args, **kwargs)
            self._prefill_ms = _ms(t0)
            return out
        self.model.decoder.prefill = timed

    def encode(self, x: np.ndarray):
        import torch

        x = np.asarray(x, dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise InputImageError(f"model input has shape {tuple(x.shape)}, expected [3, H, W]",
                                  fix="preprocess with pcbedge.data.preprocess.load_pair")
        t0 = time.perf_counter()
        with torch.no_grad():
            enc = self.model.encode_image(torch.from_numpy(x).to(self.device))
        enc = {k: v.cpu() for k, v in enc.items()}
        enc["vision_ms"] = _ms(t0)
        return enc

    def answer_encoded(self, enc: dict, question: str, meta: PairMeta | None = None, *,
                       max_new_tokens: int = 64, pruning=None) -> dict:
        t_start = time.perf_counter()
        validate_question(question)
        validate_max_new_tokens(max_new_tokens)
        cfg: TokenPruningConfig = self.pruning if pruning is None else as_pruning_config(pruning)
        n_total = int(enc["visual_tokens"].shape[1])
        keep = None
        if cfg.enabled:
            keep = select_tokens(enc[SCORE_OUTPUTS[cfg.method]][0].numpy(), cfg)
        tensors = {k: v for k, v in enc.items() if k != "vision_ms"}
        t0 = time.perf_counter()
        ans = self.model.answer_encoded(tensors, question, meta, max_new_tokens, keep)
        loop_ms = _ms(t0)
        ans["latency_ms"] = {"preprocess": 0.0, "vision": enc["vision_ms"],
                             "prefill": self._prefill_ms,
                             "decode": round(max(loop_ms - self._prefill_ms, 0.0), 3),
                             "total": round(enc["vision_ms"] + _ms(t_start), 3)}
        ans["info"] = {"visual_tokens_kept": n_total if keep is None else int(len(keep)),
                       "visual_tokens_total": n_total, "pruning": cfg.to_dict(),
                       "new_tokens": len(ans["token_ids"]), "engine": "torch",
                       "providers": [self.device]}
        return ans
