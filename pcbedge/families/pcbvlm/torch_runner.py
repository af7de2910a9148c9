"""The reference model on PyTorch (``ask --model``): the same protocol as the ONNX runner, over
the model's own answer loop, so answers can be compared token for token."""
from __future__ import annotations

import time
from pathlib import Path

from pcbedge.families.pcbvlm.runner import as_prepared, check_input, prepare_board
from pcbedge.runtime import validate_max_new_tokens, validate_question
from pcbedge.runtime.protocol import Encoded, Prepared, Runner, ms_since
from pcbedge.runtime.pruning import (TokenPruningConfig, as_pruning_config,
                                     select_tokens)


def open_runner(model_dir: Path, **kwargs) -> "PcbVlmTorchRunner":
    """The family's ``torch_runner`` role (pcbedge.families.base.Family.torch_runner)."""
    return PcbVlmTorchRunner(model_dir, **kwargs)


class PcbVlmTorchRunner(Runner):
    """Runs a ``pcbvlm`` checkpoint folder with PyTorch."""

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, pruning=None,
                 device: str = "cpu", family=None):
        import torch

        from pcbedge.families import detect_family

        self.model_dir = Path(model_dir)
        family = family or detect_family(self.model_dir)
        family.check_model_dir(self.model_dir)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.model = family.load_model(self.model_dir).to(device)
        self.device = device
        self.input_size = family.default_input_size(self.model)
        self.manifest = {"family": family.name, "input_size": self.input_size}
        self.pruning = as_pruning_config(pruning)
        self._prefill_ms = 0.0
        self._timed_prefill()

    def _timed_prefill(self) -> None:
        """Time the decoder prefill inside the model's answer loop (to split prefill / decode)."""
        prefill = self.model.decoder.prefill

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = prefill(*args, **kwargs)
            self._prefill_ms += ms_since(t0)   # both passes (program, board)
            return out
        self.model.decoder.prefill = timed

    def prepare(self, image, template=None) -> Prepared:
        self.check_template(template)
        return prepare_board(image, template, self.input_size)

    def encode(self, prepared) -> Encoded:
        import torch

        prepared = as_prepared(prepared)
        x = check_input(prepared.inputs, 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            enc = self.model.encode_image(torch.from_numpy(x).to(self.device))
        return Encoded({k: v.cpu() for k, v in enc.items()}, prepared, ms_since(t0))

    def answer(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64,
               pruning=None) -> dict:
        t_start = time.perf_counter()
        validate_question(question)
        validate_max_new_tokens(max_new_tokens)
        cfg: TokenPruningConfig = self.pruning if pruning is None else as_pruning_config(pruning)
        enc = encoded.outputs
        n_total = int(enc["visual_tokens"].shape[1])
        keep = None
        if cfg.enabled:
            from pcbedge.families.pcbvlm.export import SCORE_OUTPUTS
            keep = select_tokens(enc[SCORE_OUTPUTS[cfg.method]][0].numpy(), cfg)
        t0, self._prefill_ms = time.perf_counter(), 0.0
        ans = self.model.answer_encoded(enc, question, encoded.meta, max_new_tokens, keep)
        loop_ms = ms_since(t0)
        ans["latency_ms"] = {"preprocess": encoded.prepared.preprocess_ms,
                             "vision": encoded.vision_ms, "prefill": self._prefill_ms,
                             "decode": round(max(loop_ms - self._prefill_ms, 0.0), 3),
                             "total": round(encoded.vision_ms + ms_since(t_start), 3)}
        ans["info"] = {"visual_tokens_kept": n_total if keep is None else int(len(keep)),
                       "visual_tokens_total": n_total, "pruning": cfg.to_dict(),
                       "new_tokens": len(ans["token_ids"]), "engine": "torch",
                       "providers": [self.device]}
        return ans
