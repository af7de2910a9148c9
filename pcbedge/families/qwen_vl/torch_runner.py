"""A Qwen-VL checkpoint on PyTorch (``ask --model``): the same protocol, preprocessing, chat
template and answer parser as the ONNX runner, with transformers' ``generate`` as the model."""
from __future__ import annotations

import time
from pathlib import Path

from pcbedge.families.qwen_vl.prompt import prompt_ids, prompt_text
from pcbedge.families.qwen_vl.runner import Images, prepare_images, reply_answer
from pcbedge.runtime import validate_max_new_tokens, validate_question
from pcbedge.runtime.protocol import Encoded, Prepared, Runner, ms_since
from pcbedge.runtime.pruning import as_pruning_config


def open_runner(model_dir: Path, **kwargs) -> "QwenVlTorchRunner":
    """The family's ``torch_runner`` role (pcbedge.families.base.Family.torch_runner)."""
    return QwenVlTorchRunner(model_dir, **kwargs)


class QwenVlTorchRunner(Runner):
    """transformers' model of a Qwen-VL checkpoint folder. The vision tower runs inside
    ``generate`` (its time is part of ``prefill``); pruning has no PyTorch reference."""

    template_optional = True

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, pruning=None,
                 family=None, device: str = "cpu"):
        import torch
        from tokenizers import Tokenizer

        from pcbedge.families import detect_family
        from pcbedge.families.qwen_vl.export import DEFECT_TYPES, manifest_extras

        self.model_dir = Path(model_dir)
        family = family or detect_family(self.model_dir)
        if threads is not None:
            torch.set_num_threads(int(threads))
        cfg = as_pruning_config(pruning)
        if cfg.enabled:
            from pcbedge.errors import TargetError
            raise TargetError("visual-token pruning has no PyTorch reference for Qwen-VL "
                              "(transformers cannot drop image tokens)",
                              fix="ask a built bundle to prune, or leave pruning off")
        self.model = family.load_model(self.model_dir).to(device)
        self.input_size = family.default_input_size(self.model)
        self.manifest = {"family": family.name, **manifest_extras(self.model, self.input_size)}
        ans = self.manifest["answer"]
        self.recipe = self.model.pcbedge_recipe
        self.chat_template = self.model.pcbedge_chat_template[0]
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.eos = set(int(e) for e in ans["eos_token_ids"])
        self.image_token_id = int(ans["image_token_id"])
        self.special_tokens = dict(ans["special_tokens"])
        self.box_coords, self.defect_types = ans["box_coordinates"], tuple(DEFECT_TYPES)

    def prepare(self, image, template=None) -> Prepared:
        return prepare_images(image, template, self.recipe)

    def encode(self, prepared: Prepared) -> Encoded:
        return Encoded(None, prepared, 0.0)

    def answer(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64,
               pruning=None) -> dict:
        from pcbedge.families.qwen_vl.export import generate_reference

        t0 = time.perf_counter()
        validate_question(question)
        validate_max_new_tokens(max_new_tokens)
        images: Images = encoded.prepared.inputs
        text = prompt_text(self.chat_template, question, len(images.grids), None,
                           self.special_tokens)
        ids = prompt_ids(self.tokenizer, text, images.grids, image_token_id=self.image_token_id,
                         merge=self.recipe.merge_size, where=str(self.model_dir))
        out = generate_reference(self.model, ids, images, max_new_tokens)
        gen_ms = ms_since(t0)
        complete = bool(out) and out[-1] in self.eos
        ans = reply_answer(self.tokenizer, out, self.eos, images, self.box_coords,
                           self.defect_types, complete)
        ans["latency_ms"] = {"preprocess": encoded.prepared.preprocess_ms, "vision": 0.0,
                             "prefill": gen_ms, "decode": 0.0, "total": gen_ms}
        n_img = sum(1 for t in ids if t == self.image_token_id)
        ans["info"] = {"visual_tokens_kept": n_img, "visual_tokens_total": n_img,
                       "prefill_tokens": len(ids), "pruning": as_pruning_config(None).to_dict(),
                       "new_tokens": len(out), "engine": "torch", "providers": ["cpu"],
                       "note": "generate() runs vision, prefill and decode as one call"}
        return ans
